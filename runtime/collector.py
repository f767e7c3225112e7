"""Python's cyclic garbage collector kept from stopping the serving threads for long.

A process that has built, compiled and captured a policy holds hundreds of thousands of objects the
cyclic collector tracks (pi05_tiny on the CPU: about 180,000; a full collection of them took 70 ms on
the CI host). CPython runs a full collection whenever the long-lived objects have grown by a quarter
since the last one: at a moment of its choosing while robots are served, every Python thread stopped
for the length of the scan (the robots' submits, the batcher, the completion of frames). On the H200 one
took 2.2 s in a 60 s fleet run (docs/many_robots.md).

`gc.freeze()` moves every object tracked so far into a generation the collector never scans. What a
start-up makes (modules, compiled graphs, captured profiles' buffers) lives as long as the executor
anyway; objects made while serving are collected as before, in collections of their own size. The
executor freezes after each capture (ahead of serving, and a profile captured lazily) and after each
profile's first frame (what a first run builds lazily: library handles, caches), each time after a
collection, so that no garbage of the moment is kept for good. When an executor closes, or fails to
start, everything is thawed so that its objects can be freed; where other executors are still alive,
what they keep is collected and frozen again at once (a process that builds several executors, one
after another, would otherwise keep each one's memory, GPU memory included, to its end). The freezing is
process-wide: an application's own gc.freeze() is thawed with it.

Frozen, a full collection still came about once a minute on the H200 and took 11-16 ms, long enough to
split a tick of robots in step. `WhileDeviceBusy` (RuntimeConfig.garbage_collection "while_device_busy",
an experiment until measured on a GPU) takes the full collections over: CPython's own are turned off
(the oldest generation's threshold; the young generations' collections, under 2 ms, stay automatic),
and the executor's dispatcher runs one right after it has put a frame on the device, when that
profile's frames keep the device busy for at least twice the last one's pause: the host has nothing to
do for the device meanwhile. At most one every PERIOD_S; past OVERDUE_S without one, at the next frame
whatever its length (a cyclic garbage that only grows would be worse than one stop).
"""

from __future__ import annotations

import gc
import threading
import time

PERIOD_S = 5.0  # full collections at most this often (CPython's own came about once a minute, frozen)
OVERDUE_S = 60.0  # without one for this long, the next frame gets one, fitting or not
FIRST_PAUSE_S = 0.010  # assumed for the first collection (measured on the H200: 11-16 ms, frozen)
NEVER = 2**31 - 1  # a threshold for the oldest generation that is never reached
GARBAGE_COLLECTION = ("automatic", "while_device_busy")  # RuntimeConfig.garbage_collection


_live_executors = 0  # started and not yet closed, in this process
_live_lock = threading.RLock()  # a collection may run finalizers that close an executor


def freeze_long_lived() -> None:
    """After a collection, every object still tracked out of the collector's scans (gc.freeze)."""
    with _live_lock:
        gc.collect()
        gc.freeze()


def thaw() -> None:
    """Frozen objects back into the oldest generation, to be collected when garbage (gc.unfreeze)."""
    gc.unfreeze()


def executor_started() -> None:
    global _live_executors
    with _live_lock:
        _live_executors += 1


def executor_closed() -> None:
    """An executor closed, or failed to start: its objects can be freed. The others' are frozen again."""
    global _live_executors
    with _live_lock:
        _live_executors -= 1
        thaw()
        if _live_executors > 0:
            gc.collect()
            gc.freeze()


class WhileDeviceBusy:
    """Full collections at moments the executor chooses (see the module's docstring). Several executors
    in a process share the takeover: CPython's thresholds come back when the last one lets go."""

    _holders = 0
    _saved: tuple[int, int, int] | None = None
    _lock = threading.Lock()

    def __init__(self, clock=time.monotonic, collect=gc.collect):
        self._clock, self._collect = clock, collect
        self._last = clock()  # as if one had just run: the first waits a period
        self._pause_s = FIRST_PAUSE_S
        self.collections = 0
        self._held = False
        with WhileDeviceBusy._lock:
            if WhileDeviceBusy._holders == 0:
                WhileDeviceBusy._saved = gc.get_threshold()
                young, middle, _ = WhileDeviceBusy._saved
                gc.set_threshold(young, middle, NEVER)
            WhileDeviceBusy._holders += 1
            self._held = True

    def after_issue(self, busy_s: float | None) -> bool:
        """A frame went to the device, which frames of its profile keep busy for `busy_s` (None: not
        measured yet). Collects now if one is due and fits; says whether it did."""
        now = self._clock()
        if now - self._last < PERIOD_S:
            return False
        fits = busy_s is not None and self._pause_s <= busy_s / 2
        if not fits and now - self._last < OVERDUE_S:
            return False
        self._collect(2)
        self._last = self._clock()
        self._pause_s = self._last - now
        self.collections += 1
        return True

    def close(self) -> None:
        """Let go of the takeover (CPython's thresholds back when no other executor holds it)."""
        with WhileDeviceBusy._lock:
            if not self._held:
                return
            self._held = False
            WhileDeviceBusy._holders -= 1
            if WhileDeviceBusy._holders == 0 and WhileDeviceBusy._saved is not None:
                gc.set_threshold(*WhileDeviceBusy._saved)
