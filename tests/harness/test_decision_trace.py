"""The fleet benchmarks' trace of the server's decisions (benchmarks/decision_trace.py): it records what
the real BatchHold was asked and answered, unchanged, and cuts the window around each late chunk, on a
fake clock."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from vla_runtime.runtime.batching import BatchHold

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from decision_trace import AFTER_S, BEFORE_S, LATE_TRACED, DecisionTrace  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_trace_records_the_decisions_unchanged_and_cuts_the_window_around_a_late_chunk():
    clock = FakeClock()
    hold = BatchHold(lambda n: n, max_batch=8, margin_s=0.005)
    with DecisionTrace(hold, clock) as trace:
        check_the_window(hold, trace, clock)


def check_the_window(hold: BatchHold, trace: DecisionTrace, clock: FakeClock) -> None:
    untraced = BatchHold(lambda n: n, max_batch=8, margin_s=0.005)
    for robot, at in (("r0", 100.0), ("r1", 100.002)):
        clock.now = at + 0.001  # registered a millisecond after its submit began
        hold.arrived(robot, at)
        untraced.arrived(robot, at)
    clock.now = 100.004
    assert hold.decide(2, 100.05, 100.004) == untraced.decide(2, 100.05, 100.004)
    hold.issued(2, 100.004)
    clock.now = 100.03
    hold.served(2, 100.004, 100.03)
    clock.now = 100.5  # long after: outside every window below
    hold.arrived("r0", 100.5)

    (window,) = trace.around([("r1", 100.002, 0.0015)])
    assert window["robot"] == "r1" and window["woke_late_ms"] == 1.5
    events = window["events"]
    assert [e["event"] for e in events] == ["arrived", "arrived", "decide", "issued", "served"]
    assert events[0] == {"ms": -1.0, "event": "arrived", "robot": "r0", "submitted": -2.0}
    assert events[2]["waiting"] == 2 and events[2]["earliest_deadline_in_ms"] == 46.0
    assert (events[2]["take"], events[2]["wait_ms"]) == (2, 0.0)
    assert events[4] == {"ms": 28.0, "event": "served", "size": 2, "issued": 2.0}
    assert all(-BEFORE_S * 1e3 <= e["ms"] <= AFTER_S * 1e3 for e in events)


def test_only_the_first_late_chunks_are_traced():
    with DecisionTrace(BatchHold(lambda n: n, max_batch=8, margin_s=0.005), FakeClock()) as trace:
        late = [(f"r{i}", 100.0 + i, 0.0) for i in range(LATE_TRACED + 3)]
        assert [w["robot"] for w in trace.around(late)] == [r for r, _, _ in late[:LATE_TRACED]]


def test_the_collectors_pauses_are_recorded_until_closed():
    trace_target = BatchHold(lambda n: n, max_batch=8, margin_s=0.005)
    with DecisionTrace(trace_target) as trace:
        assert "decide" in vars(trace_target)
        gc.collect(2)
        gc.collect(0)
    assert trace._collected not in gc.callbacks
    assert "decide" not in vars(trace_target)  # unwrapped: the class's method again
    recorded = trace.gc_pauses()
    gc.collect(2)  # not recorded
    pauses = trace.gc_pauses()
    assert pauses == recorded
    assert pauses["2"]["count"] >= 1 and pauses["0"]["count"] >= 1
    assert 0 <= pauses["2"]["max_ms"] <= pauses["2"]["total_ms"]
