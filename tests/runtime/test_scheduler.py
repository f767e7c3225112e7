"""ChunkScheduler on a fake clock: publication on arrival, the deadline watch, the one definition of miss."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.runtime.scheduler import ChunkScheduler
from vla_runtime.runtime.types import ActionChunk


def chunk(t: float, n: int = 10) -> ActionChunk:
    return ActionChunk(np.arange(n, dtype=np.float32)[:, None] + t, timestamp=t)


def test_a_chunk_is_published_on_arrival_aligned_to_its_observation():
    s = ChunkScheduler(0.05)
    s.observed(10.0)
    out = s.offer(chunk(10.0), now=10.12)  # 120 ms after the observation: the periods of 0 and 1 have ended
    assert out.fresh and out.first_index == 2 and len(out.actions) == 8
    assert out.actions[0, 0] == pytest.approx(12.0) and out.age_s == pytest.approx(0.12)
    assert s.counters["misses"] == 1  # answered, but 70 ms after its deadline
    on_time = s.offer(chunk(10.2), now=10.219)
    assert on_time.first_index == 0 and s.counters["misses"] == 1  # action 0 holds until 10.25
    figures = s.figures()
    assert figures["fresh"] == 2 and figures["age_p50_ms"] == pytest.approx((120 + 19) / 2)


def test_a_missed_deadline_publishes_the_tail_once_and_counts_the_miss():
    s = ChunkScheduler(0.05, deadline_s=0.05)
    s.observed(0.0)
    assert s.offer(chunk(0.0), now=0.01).first_index == 0
    s.observed(0.2)
    assert s.check(0.25) is None  # its deadline is 0.25: not passed yet
    tail = s.check(0.26)
    assert not tail.fresh and tail.first_index == 5 and s.counters["misses"] == 1
    assert s.check(0.30) is None  # the miss was counted once; no new deadline passed
    s.observed(0.3)
    s.observed(0.35)  # two observations in flight, both late: two misses at one check
    assert s.check(0.449).first_index == 8 and s.counters["misses"] == 3 and s.counters["tails"] == 2
    s.observed(0.5)
    assert s.check(0.56) is None and s.counters["exhausted"] == 1  # nothing left: nothing published


def test_the_chunk_answers_every_older_pending_observation():
    s = ChunkScheduler(0.05)
    for stamp in (1.0, 1.01, 1.02):  # the first two were dropped by the executor (newest wins)
        s.observed(stamp)
    assert s.offer(chunk(1.02), now=1.04).fresh
    assert s.check(2.0) is None and s.counters["misses"] == 0


def test_newest_observation_wins_and_late_chunks_are_discarded():
    s = ChunkScheduler(0.05)
    assert s.offer(chunk(1.05), now=1.06) is not None
    assert s.offer(chunk(0.9), now=1.07) is None and s.counters["late_chunks"] == 1
    assert s.offer(chunk(1.05), now=1.08) is None and s.counters["late_chunks"] == 2


def test_a_chunk_that_expired_while_computed_is_counted_not_published():
    s = ChunkScheduler(0.1)
    assert s.offer(chunk(0.0, n=3), now=0.1).first_index == 1  # action 1 starts exactly now
    assert s.offer(chunk(0.01, n=3), now=0.109).first_index == 0  # action 0 holds until 0.11
    assert s.offer(chunk(0.05, n=3), now=0.36) is None and s.counters["exhausted"] == 1


def test_reset_forgets_the_chunk_and_the_pending_deadlines():
    s = ChunkScheduler(0.05)
    s.offer(chunk(5.0), now=5.01)
    s.observed(5.1)
    s.reset()  # e.g. the clock jumped back to 0
    assert s.check(5.3) is None and s.counters["misses"] == 0
    assert s.offer(chunk(0.5), now=0.51).fresh  # older than the forgotten chunk, accepted after the reset
    for bad in ({"period_s": 0.0}, {"period_s": 0.05, "deadline_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(k for k, v in bad.items() if v <= 0))):
            ChunkScheduler(**bad)


def test_the_expected_delay_is_a_high_percentile_of_recent_ages_in_actions():
    """Ages of 20 ms mostly and 130 ms now and then: the mean would say action 0, the 95th percentile
    says the robot is two actions on when a slow chunk lands; only the last DELAY_WINDOW chunks count."""
    from vla_runtime.runtime.scheduler import DELAY_WINDOW

    s = ChunkScheduler(0.05)
    assert s.expected_delay_steps() == 0  # nothing measured yet
    t = 100.0
    for k in range(DELAY_WINDOW):
        t += 1.0
        s.observed(t)
        s.offer(chunk(t), now=t + (0.13 if k % 10 == 0 else 0.02))
    assert s.expected_delay_steps() == 2 and s.figures()["expected_delay_steps"] == 2
    for _ in range(DELAY_WINDOW):  # the slow ones leave the window
        t += 1.0
        s.observed(t)
        s.offer(chunk(t), now=t + 0.02)
    assert s.expected_delay_steps() == 0


def test_the_previous_chunk_is_aligned_to_the_new_observation():
    s = ChunkScheduler(0.05)
    assert s.previous_chunk(1.0) is None  # no chunk yet
    s.observed(1.0)
    s.offer(chunk(1.0), now=1.12)  # age 120 ms: the expected delay is 2 actions
    previous = s.previous_chunk(1.15)  # three periods later: action 3 of the current chunk is due
    assert previous.delay_steps == 2 and previous.actions[0, 0] == pytest.approx(4.0)
    assert len(previous.actions) == 7
    assert s.previous_chunk(1.5) is None  # the chunk has ended by then
    figures = s.figures()
    assert figures["handover"] == "switch" and figures["frozen_steps"] == 0 and figures["steps"] == 0


def test_chunks_stamped_ahead_of_this_clock_expect_no_delay():
    """Observations stamped a little ahead of the node's clock (skew within max_future_s, or a stopped sim
    clock): their chunks' ages are negative; the expected delay is 0 actions, never -1, so the hand-over
    modes' previous chunk passes its checks (with -1 every later observation was refused)."""
    s = ChunkScheduler(0.05)
    for k in range(5):
        stamp = 100.0 + k
        s.observed(stamp)
        assert s.offer(chunk(stamp), now=stamp - 0.05) is not None  # 50 ms "in the future"
    assert s.expected_delay_steps() == 0
    previous = s.previous_chunk(104.0)
    assert previous is not None and previous.checked(1).delay_steps == 0  # chunk() has one action dim
