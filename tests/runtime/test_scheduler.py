"""DeadlineScheduler on a fake clock."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.runtime.scheduler import DeadlineScheduler
from vla_runtime.runtime.types import ActionChunk


def chunk(t: float, n: int = 10) -> ActionChunk:
    return ActionChunk(np.arange(n, dtype=np.float32)[:, None] + t, timestamp=t)


def test_fresh_chunk_is_aligned_to_its_observation_time():
    s = DeadlineScheduler(0.05)
    s.offer(chunk(10.0))
    out = s.tick(10.12)  # 120 ms after the observation: actions 0..2 are due at 0, 50, 100 ms -> passed
    assert out.fresh and out.first_index == 3 and len(out.actions) == 7
    assert out.actions[0, 0] == pytest.approx(13.0)


def test_missed_deadline_publishes_the_tail_and_counts_a_miss():
    s = DeadlineScheduler(0.05)
    s.offer(chunk(0.0))
    assert s.tick(0.01).first_index == 1
    tail = s.tick(0.26)
    assert not tail.fresh and tail.first_index == 6 and s.counters["misses"] == 1
    assert s.tick(0.449).first_index == 9 and s.counters["misses"] == 2
    assert s.tick(0.51) is None and s.counters["exhausted"] == 1  # nothing left: nothing published


def test_newest_observation_wins_and_late_chunks_are_ignored():
    s = DeadlineScheduler(0.05)
    s.offer(chunk(1.0))
    s.offer(chunk(1.05))
    assert s.counters["superseded"] == 1
    s.offer(chunk(0.9))  # an older observation finishing late
    assert s.counters["late_chunks"] == 1
    out = s.tick(1.06)
    assert out.chunk.timestamp == 1.05 and out.fresh


def test_exact_boundaries_and_reset():
    s = DeadlineScheduler(0.1)
    s.offer(chunk(0.0, n=3))
    assert s.tick(0.1).first_index == 1  # an action due exactly now is still sent
    s.reset()
    assert s.tick(0.15) is None
    with pytest.raises(ValueError, match="period_s"):
        DeadlineScheduler(0.0)
