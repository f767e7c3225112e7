"""Python's cyclic garbage collector kept from stopping the serving threads for long.

A process that has built, compiled and captured a policy holds hundreds of thousands of objects the
cyclic collector tracks (pi05_tiny on the CPU: about 180,000; a full collection of them took 70 ms on
the CI host). CPython runs a full collection whenever the long-lived objects have grown by a quarter
since the last one: at a moment of its choosing while robots are served, every Python thread stopped
for the length of the scan (the robots' submits, the batcher, the completion of frames). On the H200 one
took 2.2 s in a 60 s fleet run, start-up unfrozen, four processes sharing the host (docs/many_robots.md).

`gc.freeze()` moves every object tracked so far into a generation the collector never scans. What a
start-up makes (modules, compiled graphs, captured profiles' buffers) lives as long as the executor
anyway; objects made while serving are collected as before, in collections of their own size. The
executor freezes after each capture (ahead of serving, and a profile captured lazily), after a
collection of the young generations so that the garbage of the moment is not kept for good, and after
each profile's first frame
(what a first run builds lazily: library handles, caches), there without a collection (it may come
while serving). When an executor closes, or fails to start, everything is thawed so that its objects can
be freed; where other executors are still alive, what they keep is collected and frozen again at once:
a full collection of everything, a stop for them, and the closing executor itself, still referenced by
its caller, frozen again with them (its memory is freed when the last executor closes; build and close
executors one at a time to free each one's). The freezing is process-wide: an application's own
gc.freeze() is thawed with it.

Frozen, full collections still came on the H200: 3 a minute of 19-35 ms before the server's reference
cycle per observation was removed, one of 5.6-21 ms a minute after it (robots in step), and where it fell
in a tick's gather the batch split and chunks came late (2 and 13 in two of four 60 s GPU-runs).
`WhileDeviceBusy` (RuntimeConfig.garbage_collection "while_device_busy", the default where CPython
allows it) takes them over for the executor's life: CPython's automatic full collections are turned off
(the oldest generation's threshold; the young generations' collections stay automatic), and the
executor's dispatcher runs one right after it has put a frame on the device, when that frame is alone
there and its profile's frames keep the device busy for at least twice the last pause: the host has
nothing to do for the device meanwhile. With it, four of four such GPU-runs had no late chunk
(docs/many_robots.md). At most one every PERIOD_S for the whole process (executors share the schedule);
past OVERDUE_S without one, at the next such frame whatever its length. And once no executor has had
a frame submitted or ended for IDLE_S, an idle executor's watchdog runs one (once per idle spell, then
one per OVERDUE_S): a paused robot's node still frees its cyclic garbage, and does not meet a collection
long overdue when it serves again; a frame submitted during it waits for the pause. GPU only (on the
CPU a frame is computed while it is issued), and CPython 3.11 to 3.13 with the GIL: 3.14's incremental
collector and free-threaded builds ignore that threshold; there the mode is refused and the default is
"automatic".
"""

from __future__ import annotations

import gc
import sys
import sysconfig
import threading
import time

PERIOD_S = 5.0  # full collections at most this often (CPython's own came about once a minute, frozen)
OVERDUE_S = 60.0  # without one for this long, the next frame gets one, fitting or not
FIRST_PAUSE_S = 0.010  # assumed for the first collection (measured on the H200: 11-16 ms, frozen)
IDLE_S = 1.0  # no frame submitted or ended for this long: idle (a frame submitted then waits for the pause)
NEVER = 2**31 - 1  # a threshold for the oldest generation that is never reached
GARBAGE_COLLECTION = ("automatic", "while_device_busy")  # RuntimeConfig.garbage_collection


def generational_thresholds() -> bool:
    """CPython's collector here is the generational one whose third threshold starts full collections
    (3.11 to 3.13, with the GIL): what WhileDeviceBusy turns off."""
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return sys.implementation.name == "cpython" and sys.version_info < (3, 14) and not free_threaded


def default_garbage_collection() -> str:
    """RuntimeConfig.garbage_collection's default: the executor's collections where the interpreter
    allows them (measured on the H200: docs/many_robots.md), CPython's own elsewhere."""
    return "while_device_busy" if generational_thresholds() else "automatic"


DEFAULT_GARBAGE_COLLECTION = default_garbage_collection()


_live_executors = 0  # started and not yet closed, in this process
_live_lock = threading.RLock()  # a collection may run finalizers that close an executor


def freeze_long_lived(collect: bool = True) -> None:
    """Every object tracked so far out of the collector's scans (gc.freeze), after a collection of the
    young generations unless `collect` is False (while serving, where any pause counts). Not a full
    collection: at start-up that scans everything (one took 2.2 s on the H200 in a process serving pi05,
    unfrozen), time a node's start-up would pay; garbage old enough to sit in the oldest generation
    stays frozen (little, at start-up)."""
    with _live_lock:
        if collect:
            gc.collect(1)
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
    in a process share the takeover and its schedule: CPython's threshold comes back when the last one
    lets go."""

    _holders = 0
    _saved_third: int | None = None
    _last = 0.0  # when the last collection ended (the shared schedule)
    _pause_s = FIRST_PAUSE_S  # how long it took
    _active = float("-inf")  # when an executor last had a frame submitted or leave the device (shared)
    _lock = threading.Lock()

    def __init__(self, clock=time.monotonic, collect=gc.collect):
        self._clock, self._collect = clock, collect
        self.collections = 0  # run by this executor
        with WhileDeviceBusy._lock:
            if WhileDeviceBusy._holders == 0:
                young, middle, WhileDeviceBusy._saved_third = gc.get_threshold()
                gc.set_threshold(young, middle, NEVER)
                WhileDeviceBusy._last = clock()  # as if one had just run: the first waits a period
                WhileDeviceBusy._active = WhileDeviceBusy._last  # and as if a frame had just left
                WhileDeviceBusy._pause_s = FIRST_PAUSE_S
            WhileDeviceBusy._holders += 1
            self._held = True

    def after_issue(self, busy_s: float | None) -> bool:
        """A frame went to the device, alone there, which frames of its profile keep busy for `busy_s`
        (None: not measured yet). Collects now if one is due and fits; says whether it did."""
        with WhileDeviceBusy._lock:
            now = self._clock()
            since = now - WhileDeviceBusy._last
            if since < PERIOD_S:
                return False
            fits = busy_s is not None and WhileDeviceBusy._pause_s <= busy_s / 2
            if not fits and since < OVERDUE_S:
                return False
            WhileDeviceBusy._last = now  # taken: nobody else collects meanwhile
        return self._collect_now(now)

    def active(self) -> None:
        """An executor had a frame submitted, or one left the device: not idle."""
        WhileDeviceBusy._active = self._clock()

    def when_idle(self) -> bool:
        """The caller's executor has nothing submitted, taken or on the device: collects if no executor
        has had a frame submitted or leave its device for IDLE_S, and the last collection came before
        that (one per idle spell; then one per OVERDUE_S) and at least a period ago; says whether it did.
        A frame submitted meanwhile waits for the pause."""
        with WhileDeviceBusy._lock:
            now = self._clock()
            idle_s, since = now - WhileDeviceBusy._active, now - WhileDeviceBusy._last
            first_of_spell = WhileDeviceBusy._last < WhileDeviceBusy._active
            due = since >= PERIOD_S and (first_of_spell or since >= OVERDUE_S)
            if not self._held or idle_s < IDLE_S or not due:
                return False
            WhileDeviceBusy._last = now  # taken: nobody else collects meanwhile
        return self._collect_now(now)

    def _collect_now(self, started: float) -> bool:
        """A full collection, outside the lock (a finalizer it runs may close an executor, which takes
        the lock), then timed."""
        self._collect(2)
        with WhileDeviceBusy._lock:
            WhileDeviceBusy._last = self._clock()
            WhileDeviceBusy._pause_s = WhileDeviceBusy._last - started
            self.collections += 1
        return True

    def close(self) -> None:
        """Let go of the takeover: CPython's threshold back when no other executor holds it (unless the
        application set another meanwhile)."""
        with WhileDeviceBusy._lock:
            if not self._held:
                return
            self._held = False
            WhileDeviceBusy._holders -= 1
            young, middle, third = gc.get_threshold()
            if WhileDeviceBusy._holders == 0 and third == NEVER and WhileDeviceBusy._saved_third is not None:
                gc.set_threshold(young, middle, WhileDeviceBusy._saved_third)
