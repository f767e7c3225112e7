"""What the policy server did around each late chunk: its arrivals, batching decisions, issues and ends.

`DecisionTrace(server.batching)` wraps the server's BatchHold (the one object every decision goes
through) and records, on the server's monotonic clock:
- `arrived`: a robot's observation registered (`at`: its submit's start; the event's own time is when its
  preparation ended and it joined the queue),
- `decide`: the observations waiting, the earliest deadline's distance, and the answer (take, wait),
- `issued` and `served`: a batch of n went to the executor, and its frame ended;
- `gc`: a collection of Python's cyclic garbage collector, its generation, its pause (every thread
  of the process waits it out) and the thread that ran it.
`around(late)` then cuts, for each of the first few late chunks (robot, when it was sent), the events
from a period before its send to two after, in ms from the send: a straggler that came after its
tick's batch went, a batch that waited on a busy device, a decision that split a tick, each shows there.

Used by benchmarks/fleet_bench.py and benchmarks/fleet_sim.py (`--trace`); the server itself keeps no log.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import defaultdict

BEFORE_S, AFTER_S = 0.05, 0.10  # of a late chunk's send: the window cut around it
LATE_TRACED = 6  # late chunks traced per run (the first ones)


class DecisionTrace:
    """A context manager: on exit the garbage collector's callback is removed, however the run ended."""

    def __init__(self, batching, clock=time.monotonic):
        # No lock: a collection can start inside any allocation, and its callback runs on that thread,
        # which may be inside a traced method already; list.append alone is atomic in CPython.
        self._events: list[tuple[float, str, dict]] = []
        self._clock = clock
        self._wrapped: list[tuple[object, str]] = []  # (object, method name), unwrapped on close
        self._wrap(batching, "arrived", lambda args, _: {"robot": args[0], "submitted": args[1]})
        self._wrap(
            batching,
            "decide",
            lambda args, out: {
                "waiting": args[0],
                "earliest_deadline_in_ms": round((args[1] - args[2]) * 1e3, 2),
                "take": out[0],
                "wait_ms": round(out[1] * 1e3, 2),
            },
        )
        self._wrap(batching, "issued", lambda args, _: {"size": args[0]})
        self._wrap(batching, "served", lambda args, _: {"size": args[0], "issued": args[1]})
        self._gc_started = 0.0
        gc.callbacks.append(self._collected)

    def _collected(self, phase: str, info: dict) -> None:
        """gc.callbacks: a collection's start and stop, on the thread that collects."""
        if phase == "start":
            self._gc_started = self._clock()
            return
        pause_ms = round((self._clock() - self._gc_started) * 1e3, 2)
        thread = threading.current_thread().name  # the executor's dispatcher (while_device_busy) or any
        detail = {"generation": info["generation"], "pause_ms": pause_ms, "thread": thread}
        self._events.append((self._gc_started, "gc", detail))

    def close(self) -> None:
        """Nothing more recorded: the collector's callback removed (it is process-wide), the methods
        unwrapped."""
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)
        for batching, name in self._wrapped:
            vars(batching).pop(name, None)  # the instance's wrapper: the class's method again
        self._wrapped.clear()

    def __enter__(self) -> DecisionTrace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gc_pauses(self) -> dict[str, dict]:
        """Per generation: the collections recorded, their longest and their total pause (ms)."""
        pauses = [(d["generation"], d["pause_ms"]) for _, kind, d in list(self._events) if kind == "gc"]
        by_generation: dict[int, list[float]] = defaultdict(list)
        for generation, ms in pauses:
            by_generation[generation].append(ms)
        return {
            str(g): {"count": len(v), "max_ms": max(v), "total_ms": round(sum(v), 2)}
            for g, v in sorted(by_generation.items())
        }

    def _wrap(self, batching, name: str, describe) -> None:
        method = getattr(batching, name)
        self._wrapped.append((batching, name))

        def traced(*args, **kwargs):
            out = method(*args, **kwargs)
            self._events.append((self._clock(), name, describe(args, out)))
            return out

        setattr(batching, name, traced)

    def around(self, late: list[tuple[str, float, float]]) -> list[dict]:
        """For the first LATE_TRACED late chunks, (robot, its send on the same clock, how late the send came
        after its tick's schedule): the events from BEFORE_S before the send to AFTER_S after, times in ms
        from the send."""
        events = sorted(list(self._events), key=lambda e: e[0])  # threads append in their own order
        traces = []
        for robot, sent, woke_late in late[:LATE_TRACED]:
            window = []
            for t, kind, detail in events:
                if sent - BEFORE_S <= t <= sent + AFTER_S:
                    shown = {k: _relative(k, v, sent) for k, v in detail.items()}
                    window.append({"ms": round((t - sent) * 1e3, 2), "event": kind, **shown})
            traces.append({"robot": robot, "woke_late_ms": round(woke_late * 1e3, 2), "events": window})
        return traces


def _relative(key: str, value, sent: float):
    """Times (the submit's start, a batch's issue) in ms from the late chunk's send; the rest as is."""
    return round((value - sent) * 1e3, 2) if key in ("submitted", "issued") else value
