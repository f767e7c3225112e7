"""When the server holds a batch for company, and how many a batch takes, on a fake clock: never held at
light load or before anything is measured; under load held until the keep-up size, never past the latest
start of the earliest deadline, not when the device is busy past it, not for robots that do not exist,
with one frame on the device at a time only where the robots' phases are spread; a burst of robots
ticking together gathered into one batch, and not split where one batch serves it within the robots'
tick; a batch capped at the keep-up size's profile; device times per profile from issue and completion
times."""

from __future__ import annotations

import pytest
from vla_runtime.runtime.batching import GATHER_LIMIT_S, BatchHold
from vla_runtime.runtime.buffers import batch_profile

MARGIN_S = 0.005
H200_LIKE = {1: 0.011, 2: 0.015, 4: 0.023, 8: 0.039}  # device seconds per batch profile


def measured(device_s: dict[int, float], max_batch: int = 8, hold_spread: bool = True) -> BatchHold:
    """A hold that has served one batch of each profile in `device_s`, back to back from t=0."""
    hold = BatchHold(batch_profile, max_batch, MARGIN_S, hold_spread=hold_spread)
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
            hold.arrived(f"r{i}", until - 1.0 + k * period + i * period / robots)


def test_device_time_counts_from_when_the_device_could_start():
    hold = BatchHold(batch_profile, 8, MARGIN_S)
    hold.issued(4, 0.0)
    hold.issued(4, 0.001)  # on the device while the first runs
    hold.served(4, 0.0, 0.020)
    hold.served(4, 0.001, 0.041)  # started at 0.020, when the first was done
    hold.issued(1, 0.100)
    hold.served(1, 0.100, 0.110)
    hold.issued(2, 0.200)
    hold.served(2, 0.200, 0.300, computed=False)  # failed: no device time
    assert hold.device_ms() == pytest.approx({"1": 10.0, "4": 20.5})


def test_a_dropped_batch_does_not_shorten_the_one_running():
    hold = BatchHold(batch_profile, 8, MARGIN_S)
    hold.issued(4, 0.0)
    hold.issued(2, 0.001)
    hold.served(2, 0.001, 0.002, computed=False)  # dropped before it reached the device
    hold.served(4, 0.0, 0.020)
    assert hold.device_ms() == pytest.approx({"4": 20.0})


def test_nothing_is_held_before_anything_is_measured():
    hold = BatchHold(batch_profile, 8, MARGIN_S)
    robots_at(hold, 8, 20, until=10.0)
    assert hold.decide(1, earliest_deadline=10.05, now=10.0) == (1, 0.0)


def test_nothing_is_held_at_light_load_and_a_batch_takes_all_that_wait():
    """Two robots at 20 Hz (40/s): a batch of 1 (11 ms) keeps up, so each goes at once; a burst of
    three goes as one batch."""
    hold = measured(H200_LIKE)
    robots_at(hold, 2, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 1
    assert hold.decide(1, earliest_deadline=10.05, now=10.0) == (1, 0.0)
    assert hold.decide(3, earliest_deadline=10.05, now=10.0) == (3, 0.0)


def test_under_load_a_batch_waits_until_it_keeps_up_and_never_past_its_latest_start():
    """Eight robots at 20 Hz (160/s): 1 (11 ms > 6.25), 2 (15 > 12.5), 3 (in profile 4: 23 > 18.75) fall
    behind; 4 keeps up (23 <= 25). Fewer waiting are held, at most until the earliest deadline less the
    margin and the device time of one more; more waiting, the batch takes 4."""
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 4
    deadline = 10.05
    take, wait = hold.decide(1, deadline, now=10.0)
    assert take == 1 and wait == pytest.approx(deadline - MARGIN_S - 0.015 - 10.0)
    take, wait = hold.decide(3, deadline, now=10.0)
    assert take == 3 and wait == pytest.approx(deadline - MARGIN_S - 0.023 - 10.0)
    assert hold.decide(3, deadline, now=10.03) == (3, 0.0)  # past the latest start: go
    assert hold.decide(4, deadline, now=10.0) == (4, 0.0)  # keeps up: go
    assert hold.decide(7, deadline, now=10.0) == (4, 0.0)  # no more than keep up: the rest wait
    # ... unless every robot waits (nobody else is due before the next tick) and one batch of all
    # (profile 8, 39 ms) still ends before the earliest deadline less the margin
    assert hold.decide(8, deadline, now=10.0) == (8, 0.0)
    assert hold.decide(8, deadline, now=10.02) == (4, 0.0)


def test_one_frame_at_a_time_spread_robots_are_held_for_the_keep_up_size_and_capped():
    """The same load with an executor that takes one frame at a time: 8 spread robots (6.25 ms apart, a
    batch of 4 in 23 ms: the keep-up size 4). Three waiting wait for a fourth, no later than their latest
    start (the earliest deadline less the margin and a batch of 4); seven go as the profile of 4 holds.
    Without hold_spread (the server before): what waits goes at once."""
    for hold_spread in (True, False):
        hold = measured(H200_LIKE, hold_spread=hold_spread)
        robots_at(hold, 8, 20, until=10.0)
        latest_start = 10.05 - MARGIN_S - H200_LIKE[4]
        take, wait = hold.decide(3, 10.05, now=10.0, may_hold=False)
        assert (take, wait) == ((3, pytest.approx(latest_start - 10.0)) if hold_spread else (3, 0.0))
        assert hold.decide(3, 10.05, now=latest_start + 0.0001, may_hold=False) == (3, 0.0)
        assert hold.decide(7, 10.05, now=10.02, may_hold=False) == (4, 0.0)


def test_one_frame_at_a_time_spread_robots_that_left_are_not_waited_for():
    """8 spread robots for a second, then 5 of them gone (their arrivals still in the rate's window):
    the 3 left, all waiting, are not held for company that is not coming; a robot still coming is
    waited for; and one robot that replaces its own observation fast is no company for itself."""
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    for k in range(4):  # r0 to r2 go on for another 200 ms; r3 to r7 have left
        for i in range(3):
            hold.arrived(f"r{i}", 10.0 + k * 0.05 + i * 0.05 / 8)
    assert hold.keep_up_size(10.2) > 3  # the rate still counts those that left
    waiting = ["r0", "r1", "r2"]
    assert hold.decide(3, 10.25, now=10.2, may_hold=False, robots=waiting) == (3, 0.0)
    take, wait = hold.decide(2, 10.25, now=10.2, may_hold=False, robots=["r0", "r1"])
    assert take == 2 and wait > 0  # r2 is due at 10.2125
    fast = measured(H200_LIKE)
    for k in range(1000):
        fast.arrived("fast", 9.0 + k * 0.001)
    for k in range(20):
        fast.arrived("slow", 9.0 + k * 0.05 + 0.035)  # due at 10.035, after the latest start (10.03)
    assert fast.decide(1, 10.05, now=10.0, may_hold=False, robots=["fast"]) == (1, 0.0)


def test_one_frame_at_a_time_robots_in_step_are_not_held_for_company():
    """8 robots ticking together, one frame at a time: a straggler whose tick went is not held for
    company (it would hold the device when the next tick comes)."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    assert hold.keep_up_size(10.0) > 1
    hold.arrived("r3", 10.02)  # a straggler, its tick long gone
    assert hold.decide(1, earliest_deadline=10.07, now=10.02, may_hold=False) == (1, 0.0)


def test_a_burst_that_one_batch_serves_on_time_is_not_split():
    """Eight robots ticking together on the H200's device times: all eight wait at once, 50 ms from their
    deadline. One batch of 8 (39 ms) ends in time where two of the keep-up size (4: 23 + 23 ms) would not,
    so the batch takes all eight; with the device busy until 10.02 it would end too late, and the cap
    holds."""
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 4
    assert hold.decide(8, earliest_deadline=10.05, now=10.0) == (8, 0.0)
    hold.issued(4, 9.997)  # expected until 9.997 + 0.023
    assert hold.decide(8, earliest_deadline=10.05, now=10.0) == (4, 0.0)


def robots_in_step(hold: BatchHold, robots: int, hz: float, until: float, apart: float = 0.0001) -> None:
    """Observations of `robots` robots at `hz` each, ticking together (`apart` between one robot's and
    the next's), over the second before `until`."""
    for k in range(int(hz)):
        for i in range(robots):
            hold.arrived(f"r{i}", until - 1.0 + k / hz + i * apart)


def tick(hold: BatchHold, robots, at: float) -> None:
    """One tick's arrivals of robots r{i} for i in `robots`, from `at`, 0.1 ms apart."""
    for i in robots:
        hold.arrived(f"r{i}", at + i * 0.0001)


def test_a_burst_one_batch_serves_within_the_tick_is_not_split_though_late():
    """Eight robots in step, the device busy until 10.02: one batch of 8 ends at 10.059, past the deadline
    (10.05) but within the robots' 50 ms tick. Split into 4 + 4 it would end at 10.066 and the next burst
    would find the device busy too. It takes all eight. Where a batch of 8 takes longer than the tick
    (60 ms), splitting is what keeps up, and the cap holds; as it does for spread robots (above)."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    hold.issued(4, 9.997)  # expected until 9.997 + 0.023
    assert hold.keep_up_size(10.0) == 4
    assert hold.decide(8, earliest_deadline=10.05, now=10.0) == (8, 0.0)
    slow = measured({**H200_LIKE, 8: 0.060})
    robots_in_step(slow, 8, 20, until=10.0)
    slow.issued(4, 9.997)
    assert slow.decide(8, earliest_deadline=10.05, now=10.0) == (4, 0.0)


def test_spread_robots_two_of_which_came_close_are_capped():
    """8 spread robots (6.25 ms apart), two of them 4 ms apart by jitter (a chain of two within GATHER_S),
    the device busy: the robots do not tick together, so what waits is capped at the keep-up size's
    profile, not sent whole because a "burst" of two waits (a reviewer's case against c963076)."""
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    hold.arrived("r0", 10.0)
    hold.arrived("r1", 10.004)
    hold.issued(4, 9.997)  # busy until 10.02
    assert hold.decide(7, earliest_deadline=10.03, now=10.0045) == (4, 0.0)


def test_a_dense_stream_split_by_a_late_arrival_does_not_wait():
    """12 spread robots, 4.2 ms apart: their arrivals chain into one long stream (within GATHER_S of each
    other), which is not a burst of robots ticking together; after a late arrival starts a new chain,
    nothing waits for it to grow (for company it may: not here, hold_spread off)."""
    hold = measured(H200_LIKE, hold_spread=False)
    robots_at(hold, 12, 20, until=10.0)
    hold.arrived("r0", 10.006)  # after a gap longer than GATHER_S
    assert hold.decide(1, earliest_deadline=10.056, now=10.006, may_hold=False) == (1, 0.0)


def test_a_burst_is_waited_for_through_a_gap_in_its_arrivals():
    """8 robots in step; 7 of the next tick are in, then nothing for longer than GATHER_S (a robot's thread
    woke late): the 7 still wait for the eighth, until GATHER_LIMIT_S after the tick's first arrival, and
    go as one batch of 8 when it comes. Without it, they go at the limit."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    tick(hold, range(7), at=10.0)
    take, wait = hold.decide(7, earliest_deadline=10.06, now=10.0065, may_hold=False)
    assert take == 7 and wait == pytest.approx(10.0 + GATHER_LIMIT_S - 10.0065)
    assert hold.decide(7, earliest_deadline=10.06, now=10.0 + GATHER_LIMIT_S, may_hold=False) == (7, 0.0)
    hold.arrived("r7", 10.0075)  # more than GATHER_S after the seventh: a burst of its own, the tick's rest
    assert hold.decide(8, earliest_deadline=10.06, now=10.0076, may_hold=False) == (8, 0.0)


def test_a_slow_burst_is_waited_for_no_longer_than_the_gather_limit():
    """8 robots in step; in the next tick they come 4 ms apart: the batch waits for the rest, but no
    longer than GATHER_LIMIT_S from the first arrival."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    for i in range(3):
        hold.arrived(f"r{i}", 10.0 + i * 0.004)  # 10.000, 10.004, 10.008
    take, wait = hold.decide(3, earliest_deadline=10.1, now=10.0081, may_hold=False)
    assert take == 3 and wait == pytest.approx(10.0 + GATHER_LIMIT_S - 10.0081)  # not 10.008 + GATHER_S
    hold.arrived("r3", 10.012)
    assert hold.decide(4, earliest_deadline=10.1, now=10.0121, may_hold=False) == (4, 0.0)  # limit passed


def test_a_burst_still_arriving_waits_for_its_rest_and_goes_as_one_batch():
    """Eight robots ticking together: the first of a new burst waits (up to GATHER_LIMIT_S from its
    arrival) for the rest, with either executor; all eight then go as one batch (39 ms, before the
    deadline). A burst missing a robot goes without it at the limit, whole."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    hold.arrived("r0", 10.0)
    for may_hold in (True, False):
        take, wait = hold.decide(1, earliest_deadline=10.06, now=10.0, may_hold=may_hold)
        assert take == 1 and wait == pytest.approx(GATHER_LIMIT_S)
    tick(hold, range(1, 8), at=10.0)
    assert hold.decide(8, earliest_deadline=10.06, now=10.001, may_hold=False) == (8, 0.0)
    assert hold.counters["gathered"] == 2

    tick(hold, range(7), at=10.05)  # the next tick, r7 missing
    take, wait = hold.decide(7, earliest_deadline=10.11, now=10.0507, may_hold=False)
    assert take == 7 and wait == pytest.approx(10.05 + GATHER_LIMIT_S - 10.0507)
    assert hold.decide(7, earliest_deadline=10.11, now=10.05 + GATHER_LIMIT_S, may_hold=False) == (7, 0.0)


def test_a_burst_is_waited_for_no_longer_than_its_latest_start():
    """The rest of a burst is waited for until GATHER_LIMIT_S after its first arrival, but never past the
    latest start of the earliest deadline: the deadline less the margin and a batch of the burst's size."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    hold.arrived("r0", 10.0)
    # latest start: 10.045 - margin 0.005 - a batch of 8, 0.039 = 10.001
    take, wait = hold.decide(1, earliest_deadline=10.045, now=10.0, may_hold=False)
    assert take == 1 and wait == pytest.approx(0.001)
    take, wait = hold.decide(1, earliest_deadline=10.06, now=10.0045, may_hold=False)
    assert take == 1 and wait == pytest.approx(10.0 + GATHER_LIMIT_S - 10.0045)
    take, wait = hold.decide(1, earliest_deadline=10.05, now=10.0045, may_hold=False)
    assert take == 1 and wait == pytest.approx(10.05 - MARGIN_S - 0.039 - 10.0045)  # its latest start
    assert hold.decide(1, earliest_deadline=10.06, now=10.0 + GATHER_LIMIT_S, may_hold=False) == (1, 0.0)


def test_a_tick_in_lone_arrivals_is_waited_for_within_the_limit_of_its_due_robots():
    """8 robots in step; the next tick comes as lone arrivals 6 ms apart (each its own burst), with a long
    deadline: the batch waits while robots are due within GATHER_LIMIT_S of the first recent waiting
    arrival, and goes once the rest are overdue."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    arrivals = []
    for i in range(3):
        arrivals.append(10.0 + i * 0.006)  # 10.000, 10.006, 10.012
        hold.arrived(f"r{i}", arrivals[-1])
        now = arrivals[-1] + 0.0001
        take, wait = hold.decide(len(arrivals), 10.2, now=now, may_hold=False, arrivals=arrivals)
        recent = min(at for at in arrivals if at >= now - GATHER_LIMIT_S)
        assert take == i + 1 and wait == pytest.approx(recent + GATHER_LIMIT_S - now)
    # at 10.0161 the first recent arrival is 10.012, and r3..r7 (due at about 10.000) are overdue
    assert hold.decide(3, 10.2, now=10.0161, may_hold=False, arrivals=arrivals) == (3, 0.0)


def test_a_wait_ends_twice_the_limit_after_the_oldest_waiting_observation():
    """8 robots in step at 10 Hz, r7 always 9.9 ms late and absent this tick, the others' arrivals drifting
    (a long deadline): the tick's start moves as its first observations age, with r7 still due, but the
    wait ends 2 * GATHER_LIMIT_S after the oldest waiting observation."""
    hold = measured(H200_LIKE)
    for k in range(10):
        tick(hold, range(7), at=9.0 + k * 0.1)
        hold.arrived("r7", 9.0 + k * 0.1 + 0.0099)
    arrivals = [10.0, 10.003, 10.009, 10.018]
    for robot, at in zip(("r0", "r1", "r5", "r6"), arrivals, strict=True):
        hold.arrived(robot, at)
    # at 10.0192 the tick starts at 10.018 (the older ones are past GATHER_LIMIT_S) and r7 is due near it
    take, wait = hold.decide(4, 10.2, now=10.0192, may_hold=False, arrivals=arrivals)
    assert take == 4 and wait == pytest.approx(10.0 + 2 * GATHER_LIMIT_S - 10.0192)


def test_two_groups_8_ms_apart_are_not_merged_past_the_latest_start_of_the_merged_batch():
    """Two groups of 4 at 20 Hz, 8 ms apart, a 50 ms deadline: the second group is due in the first's
    tick, but a batch of 8 (39 ms) must start by 10.006, so the first group waits only until then (the
    wait is bounded by the batch it would build, not the typical one)."""
    hold = measured(H200_LIKE)
    for k in range(20):
        tick(hold, range(4), at=9.0 + k * 0.05)
        tick(hold, range(4, 8), at=9.008 + k * 0.05 - 0.0004)
    tick(hold, range(4), at=10.0)
    take, wait = hold.decide(
        4, 10.05, now=10.0004, may_hold=False, arrivals=[10.0 + i * 0.0001 for i in range(4)]
    )
    assert take == 4 and wait == pytest.approx(10.05 - MARGIN_S - 0.039 - 10.0004)


def test_a_straggler_after_its_tick_went_does_not_wait():
    """8 robots in step; 7 came and went as a batch; the eighth comes 8.5 ms after the first, after a gap:
    its tick is in (its companions came), so it goes at once."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    tick(hold, range(7), at=10.0)
    hold.arrived("r7", 10.0085)
    assert hold.decide(1, earliest_deadline=10.0585, now=10.0086, may_hold=False) == (1, 0.0)


def test_a_spread_robot_in_a_fleet_otherwise_in_step_waits_for_nobody():
    """5 robots in step and 3 spread over the period: the fleet ticks together; one of the five waits for
    the other four, due with it, but a spread robot's observation waits for nobody (nobody is due within
    GATHER_LIMIT_S of it)."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 5, 20, until=10.0)
    for k in range(20):
        for i in range(3):
            hold.arrived(f"s{i}", 9.0 + k * 0.05 + 0.0125 * (i + 1))
    hold.arrived("r0", 10.0)
    take, wait = hold.decide(1, earliest_deadline=10.06, now=10.0, may_hold=False, arrivals=[10.0])
    assert take == 1 and wait == pytest.approx(GATHER_LIMIT_S)
    hold.arrived("s0", 10.0125)
    assert hold.decide(1, 10.0625, now=10.0126, may_hold=False, arrivals=[10.0125]) == (1, 0.0)


def test_a_robot_that_left_costs_its_companions_one_tick():
    """8 robots in step; r7 stops: the first tick without it waits for it (up to the limit); the next
    tick's robots came without it last time, so they go as soon as they are in."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    tick(hold, range(7), at=10.0)
    take, wait = hold.decide(7, earliest_deadline=10.06, now=10.001, may_hold=False)
    assert take == 7 and wait == pytest.approx(10.0 + GATHER_LIMIT_S - 10.001)
    tick(hold, range(7), at=10.05)
    assert hold.decide(7, earliest_deadline=10.11, now=10.051, may_hold=False) == (7, 0.0)


@pytest.mark.parametrize(
    "arrivals",
    [
        [(f"r{i}", 9.0 + k * 0.05 + i * 0.05 / 8) for k in range(20) for i in range(8)],  # spread phases
        [(f"r{i}", 9.0 + k * 0.05 + i * 0.05 / 26) for k in range(20) for i in range(26)],  # dense: 1.9 ms
        [("fast", 9.0 + k * 0.001) for k in range(1000)] + [("slow", 9.0 + k * 0.05) for k in range(20)],
        [(f"r{i}", 9.0 + k * 0.05 + i * 0.05 / 8) for k in range(20) for i in range(8)]
        + [("r1", 9.9 + 0.0005), ("r5", 9.5 + 0.0003)],  # twice two of them close
    ],
    ids=["8 spread", "26 spread", "one robot at 1 kHz and one at 20 Hz", "8 spread, twice two close"],
)
def test_robots_not_ticking_together_never_wait_for_a_burst(arrivals):
    """Nothing gathered for them; with hold_spread (the default) they may wait for company, never past
    the latest start of a batch of two (the deadline less the margin and 15 ms)."""
    for hold_spread in (False, True):
        hold = measured(H200_LIKE, hold_spread=hold_spread)
        for robot, at in arrivals:
            hold.arrived(robot, at)
        hold.arrived(arrivals[0][0], 10.0)  # just now
        take, wait = hold.decide(1, earliest_deadline=10.05, now=10.0, may_hold=False)
        assert take == 1 and (wait <= 0.05 - MARGIN_S - H200_LIKE[2] + 1e-9 if hold_spread else wait == 0.0)
        assert hold.counters["gathered"] == 0


def test_a_keep_up_size_of_three_takes_its_profile_of_four():
    """Six robots (120/s) with a slower batch of 2 (20 ms > 16.7): 3 keep up (in profile 4, 23 <= 25), and
    a batch takes up to the 4 its profile holds."""
    hold = measured({1: 0.011, 2: 0.020, 4: 0.023, 8: 0.039})
    robots_at(hold, 6, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 3
    assert hold.decide(6, 10.05, now=10.01) == (4, 0.0)


def test_overloaded_a_batch_is_the_fullest_the_robots_can_make():
    hold = measured({1: 0.011, 8: 0.039})
    robots_at(hold, 24, 20, until=10.0)  # 480/s: not even 8 every 39 ms keeps up
    assert hold.keep_up_size(10.0) == 8
    hold = measured({1: 0.011, 8: 0.039})
    robots_at(hold, 5, 200, until=10.0)  # five robots at 200 Hz: overloaded, but five is all there are
    assert hold.keep_up_size(10.0) == 5
    assert hold.decide(5, 10.05, now=10.0) == (5, 0.0)  # all five waiting: no company is coming


def test_no_hold_for_company_that_cannot_come():
    """Four robots at 50 Hz, all four waiting: nobody else to wait for."""
    hold = measured(H200_LIKE)
    robots_at(hold, 4, 50, until=10.0)
    assert hold.decide(4, 10.05, now=10.0) == (4, 0.0)


def test_a_profile_not_yet_seen_is_estimated_from_the_next_larger_else_linearly():
    hold = measured({2: 0.015, 4: 0.024})
    robots_at(hold, 16, 20, until=10.0)  # 320/s: 4 in 24 ms does not keep up (12.5 ms); 8 in 48 ms does not
    assert hold.keep_up_size(10.0) == 8
    # one waiting: its batch of two is estimated from profile 2 (15 ms); seven: profile 8, 2 x 24 ms
    assert hold.decide(1, 10.1, now=10.0)[1] == pytest.approx(0.1 - MARGIN_S - 0.015)
    assert hold.decide(7, 10.1, now=10.0)[1] == pytest.approx(0.1 - MARGIN_S - 0.048)


def test_nothing_is_held_when_the_device_is_busy_past_the_latest_start():
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    hold.issued(8, 10.0)  # the device is busy until about 10.039
    assert hold.decide(1, earliest_deadline=10.05, now=10.0) == (1, 0.0)  # latest start 10.03: late anyway
    assert hold.decide(1, earliest_deadline=10.09, now=10.0)[1] == pytest.approx(0.09 - MARGIN_S - 0.015)


def test_the_device_is_free_once_the_last_batch_is_served_early():
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    hold.issued(8, 10.0)  # expected busy until about 10.039
    hold.served(8, 10.0, 10.010, computed=False)  # failed at once: the device is free
    assert hold.decide(1, 10.05, now=10.011)[1] == pytest.approx(0.05 - MARGIN_S - 0.015 - 0.011)


def test_the_rate_forgets_robots_that_left():
    hold = measured(H200_LIKE)
    robots_at(hold, 8, 20, until=10.0)
    assert hold.keep_up_size(10.0) == 4
    assert hold.keep_up_size(11.5) == 1  # nobody submitted for a second and a half


def test_disabled_it_takes_all_that_wait_at_once():
    hold = measured(H200_LIKE)
    hold.enabled = False
    robots_at(hold, 8, 20, until=10.0)
    assert hold.decide(1, earliest_deadline=10.05, now=10.0) == (1, 0.0)
    assert hold.decide(7, earliest_deadline=10.05, now=10.0) == (7, 0.0)


def test_a_robot_leaving_is_not_waited_for_and_joining_again_it_is():
    """Three robots under load (a batch of 3 keeps up); the third stops submitting: a second later the
    two left are not held for it; it comes back: they are again."""
    hold = measured({1: 0.030, 2: 0.040, 4: 0.045})
    for k in range(20):
        for i, robot in enumerate(("a", "b", "c")):
            hold.arrived(robot, 9.0 + k * 0.05 + i * 0.016)
    assert hold.keep_up_size(10.0) == 3
    assert hold.decide(2, 10.1, now=10.0)[1] > 0  # "c" is due: hold for it
    for k in range(20, 40):  # "c" has left
        for i, robot in enumerate(("a", "b")):
            hold.arrived(robot, 9.0 + k * 0.05 + i * 0.016)
    assert hold.keep_up_size(11.0) == 2
    assert hold.decide(2, 11.1, now=11.0) == (2, 0.0)
    for k in range(40, 60):  # "c" is back
        for i, robot in enumerate(("a", "b", "c")):
            hold.arrived(robot, 9.0 + k * 0.05 + i * 0.016)
    assert hold.keep_up_size(12.0) == 3
    assert hold.decide(2, 12.1, now=12.0)[1] > 0


def test_a_tick_whose_last_robot_began_a_burst_of_its_own_is_not_split():
    """8 robots in step; in the newest tick 7 arrive together and the eighth 6.0 ms after the seventh
    (6.6 ms after the first; more than GATHER_S: a burst of its own, as a robot's thread that woke late made
    it on the H200). All eight wait; one batch of 8 (39 ms) from 10.0067 ends 0.7 ms past the deadline less
    the margin but within the tick,
    where two of the keep-up size (4 + 4: 23 + 23 ms) would end past the deadline itself: it takes all
    eight, as it does when they came together."""
    hold = measured(H200_LIKE)
    robots_in_step(hold, 8, 20, until=10.0)
    tick(hold, range(7), at=10.0)
    hold.arrived("r7", 10.0066)
    assert hold.keep_up_size(10.0067) == 4
    assert hold.decide(8, earliest_deadline=10.05, now=10.0067, may_hold=False) == (8, 0.0)


def test_weighing_misses_a_tick_waits_past_an_early_robots_latest_start():
    """The H200's split (9508b66, GPU 0), on its device times (25.5 ms for 4, 36.2 for 8): in step, one
    robot's observation came 16 ms before the tick's other three present, four more are due. The early
    robot's latest start for a batch of 8 has passed: as before, the 4 present go now (and the due four
    after them end past their deadlines). Weighing the misses (BatchHold(weigh_misses=True)), waiting for
    the due four until the gather's limit makes only the early robot late, so it waits."""
    times = {1: 0.0164, 2: 0.018, 4: 0.0255, 8: 0.0362}
    tick = [("r4", 9.98371), ("r6", 9.99326), ("r3", 9.99627), ("r5", 9.99902)]
    now = 9.99968
    answers = []
    for weigh in (False, True):
        hold = measured(times)
        hold.weigh_misses = weigh
        robots_in_step(hold, 8, 20, until=10.0)
        for robot, at in tick:
            hold.arrived(robot, at)
        arrivals = [at for _, at in tick]
        answers.append(
            hold.decide(4, earliest_deadline=9.98371 + 0.05, now=now, may_hold=False, arrivals=arrivals)
        )
    assert answers[0] == (4, 0.0)
    take, wait = answers[1]
    assert take == 4 and wait == pytest.approx(9.99326 + GATHER_LIMIT_S - now)
