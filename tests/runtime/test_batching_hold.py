"""When the server holds a batch for company, on a fake clock: never at light load or before anything is
measured, under load until the keep-up size, never past the latest start of the earliest deadline, not
when the device is busy past it; device times per profile from issue and completion times."""

from __future__ import annotations

import pytest
from vla_runtime.runtime.batching import BatchHold
from vla_runtime.runtime.buffers import batch_profile

MARGIN_S = 0.005


def measured(device_s: dict[int, float], max_batch: int = 8) -> BatchHold:
    """A hold that has served one batch of each profile in `device_s`, back to back from t=0."""
    hold = BatchHold(batch_profile, max_batch, MARGIN_S)
    t = 0.0
    for size, seconds in device_s.items():
        hold.issued(size, t)
        hold.served(size, t, t + seconds)
        t += seconds
    return hold


def robots_at(hold: BatchHold, robots: int, hz: float, until: float) -> None:
    """Observations of `robots` robots at `hz` each, their phases spread, over the second before `until`."""
    period = 1.0 / hz
    for k in range(int(hz)):
        for i in range(robots):
            hold.arrived(until - 1.0 + k * period + i * period / robots)


def test_device_time_counts_from_when_the_device_could_start():
    hold = BatchHold(batch_profile, 8, MARGIN_S)
    hold.issued(4, 0.0)
    hold.issued(4, 0.001)  # on the device while the first runs
    hold.served(4, 0.0, 0.020)
    hold.served(4, 0.001, 0.041)  # started at 0.020, when the first was done
    hold.issued(1, 0.100)
    hold.served(1, 0.100, 0.110)
    hold.issued(2, 0.200)
    hold.served(2, 0.200, 0.300, ok=False)  # failed: no device time
    assert hold.device_ms() == pytest.approx({"1": 10.0, "4": 20.5})


def test_nothing_is_held_before_anything_is_measured():
    hold = BatchHold(batch_profile, 8, MARGIN_S)
    robots_at(hold, 8, 20, until=10.0)
    assert hold.hold_s(1, earliest_deadline=10.05, now=10.0) == 0.0


def test_nothing_is_held_at_light_load():
    """Two robots at 20 Hz (40/s): a batch of 1 (11 ms) keeps up, so each goes at once."""
    hold = measured({1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039})
    robots_at(hold, 2, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 1
    assert hold.hold_s(1, earliest_deadline=10.05, now=10.0) == 0.0


def test_under_load_a_batch_waits_until_it_keeps_up_and_never_past_its_latest_start():
    """Eight robots at 20 Hz (160/s): 1 (11 ms > 6.25), 2 (15 > 12.5), 3 (in profile 4: 23 > 18.75) fall
    behind; 4 keeps up (23 <= 25). Fewer pending wait, at most until the earliest deadline less the
    margin and the device time of one more."""
    hold = measured({1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039})
    robots_at(hold, 8, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 4
    deadline = 10.05
    assert hold.hold_s(1, deadline, now=10.0) == pytest.approx(deadline - MARGIN_S - 0.015 - 10.0)
    assert hold.hold_s(3, deadline, now=10.0) == pytest.approx(deadline - MARGIN_S - 0.023 - 10.0)
    assert hold.hold_s(3, deadline, now=10.03) == 0.0  # past the latest start: go
    assert hold.hold_s(4, deadline, now=10.0) == 0.0  # keeps up: go
    assert hold.hold_s(8, deadline, now=10.0) == 0.0  # full


def test_overloaded_the_keep_up_size_is_a_full_batch():
    hold = measured({1: 0.011, 8: 0.039})
    robots_at(hold, 24, 20, until=10.0)  # 480/s: not even 8 every 39 ms keeps up
    assert hold.keep_up_size(10.0) == 8


def test_a_profile_not_yet_seen_is_estimated_from_the_next_larger_else_linearly():
    hold = measured({2: 0.015, 4: 0.024})
    robots_at(hold, 16, 20, until=10.0)  # 320/s: 4 in 24 ms does not keep up (12.5 ms); 8 in 48 ms does not
    assert hold.keep_up_size(10.0) == 8
    # one pending: its batch of two is estimated from profile 2 (15 ms); seven pending: profile 8, 2 x 24 ms
    assert hold.hold_s(1, 10.1, now=10.0) == pytest.approx(0.1 - MARGIN_S - 0.015)
    assert hold.hold_s(7, 10.1, now=10.0) == pytest.approx(0.1 - MARGIN_S - 0.048)


def test_nothing_is_held_when_the_device_is_busy_past_the_latest_start():
    hold = measured({1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039})
    robots_at(hold, 8, 20, until=10.0)
    hold.issued(8, 10.0)  # the device is busy until about 10.039
    assert hold.hold_s(1, earliest_deadline=10.05, now=10.0) == 0.0  # latest start 10.03: late anyway
    assert hold.hold_s(1, earliest_deadline=10.09, now=10.0) == pytest.approx(0.09 - MARGIN_S - 0.015)


def test_the_rate_forgets_robots_that_left():
    hold = measured({1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039})
    robots_at(hold, 8, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 4
    assert hold.keep_up_size(11.5) == 1  # nobody submitted for a second and a half


def test_hold_false_never_holds():
    hold = measured({1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039})
    hold.hold = False
    robots_at(hold, 8, 20, until=10.0)
    assert hold.hold_s(1, earliest_deadline=10.05, now=10.0) == 0.0


def test_under_load_a_batch_takes_no_more_than_the_keep_up_size_profile():
    """Eight robots (keep-up size 4): a batch takes at most 4, however many wait; three robots (keep-up
    size 1, light load): a batch takes as many as wait; never holding: as many as wait."""
    hold = measured({1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039})
    robots_at(hold, 8, 20, until=10.0)
    assert hold.batch_limit(10.0) == 4
    robots_at(hold, 3, 20, until=12.0)
    assert hold.batch_limit(12.0) == 8
    hold.hold = False
    robots_at(hold, 8, 20, until=14.0)
    assert hold.batch_limit(14.0) == 8
