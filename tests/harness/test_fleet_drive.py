"""The fleet benchmark's robots (benchmarks/fleet_bench.py, `drive`): the warm-up and the counted run are
one drive with no pause between them (a pause longer than the server's memory of arrivals made every
counted run start with a server that knew no robot), and only the ticks after the warm-up are counted.
Counted on a fake server that answers at once or drops chosen ticks; no clock is asserted."""

from __future__ import annotations

import sys
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from vla_runtime.runtime.policy import FrameDropped
from vla_runtime.runtime.types import ActionChunk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fleet_bench import PERIOD_S, drive  # noqa: E402

TIMINGS = {"total": 1.0, "prepare": 0.1, "held_before_frame": 0.0, "queue_wait": 0.1, "device_total": 0.5}


def fake_server(dropped: dict[int, set[int]]):
    """`submit_for(i)` for robots whose k-th observation is answered at once, or dropped (as a newer one
    would drop it) where k is in dropped[i]. Returns it and the calls made per robot."""
    calls: dict[int, int] = defaultdict(int)

    def submit_for(i: int):
        def submit(obs, steps):
            k = calls[i]
            calls[i] += 1
            future: Future = Future()
            if k in dropped.get(i, set()):
                future.set_exception(FrameDropped(f"r{i}: tick {k} replaced"))
            else:
                future.set_result(ActionChunk(np.zeros((1, 1), np.float32), 0.0, dict(TIMINGS), steps=10))
            return future

        return submit

    return submit_for, calls


def test_only_the_ticks_after_the_warm_up_are_counted_in_one_drive():
    """2 robots, a warm-up of 2 ticks then 0.1 s (ticks 2, 3, 4): robot 0's tick 1 (warm-up) and tick 3
    (counted) dropped. Every tick was sent (no pause, no tick skipped); one miss, five chunks counted;
    the counters were snapshot once."""
    for in_step in (True, False):
        submit_for, calls = fake_server({0: {1, 3}})
        snapshots = []
        row = drive(
            submit_for,
            2,
            0.1,
            [None],
            in_step=in_step,
            warmup_s=2 * PERIOD_S,
            at_measure_start=lambda: snapshots.append(True),  # noqa: B023
        )
        assert dict(calls) == {0: 5, 1: 5}
        assert row["misses"] == 1
        assert row["fewest_chunks_per_robot"] == 2 and round(row["chunks_per_s"] * 0.1) == 5
        assert row["chunks_by_steps"] == {"10": 5}
        assert len(snapshots) == 1
        assert ("ticks" in row) == in_step
        if in_step:
            assert row["ticks"]["ticks"] == 3  # the counted ticks only
