"""The adaptive steps controller on a made-up sequence of chunk ages: down under pressure, up after a
calm run (hysteresis), every change counted, stale chunks ignored."""

from __future__ import annotations

import pytest
from vla_runtime.runtime.adaptive import StepsController, steps_ladder

DEADLINE = 0.05


def test_the_ladder_starts_at_the_configured_steps():
    assert steps_ladder(10) == (10, 5, 3, 2) and steps_ladder(4) == (4, 3, 2) and steps_ladder(2) == (2,)


def feed(c: StepsController, age_s: float, n: int, denoise_ms_per_step: float = 1.0) -> list[int]:
    out = []
    for _ in range(n):
        steps = c.steps
        out.append(c.observe(age_s, steps, denoise_ms_per_step * steps))
    return out


def test_pressure_steps_down_one_rung_at_a_time_and_calm_climbs_back():
    c = StepsController(10, DEADLINE, calm_chunks=5)
    assert feed(c, 0.020, 30) == [10] * 30 and c.counters == {"steps_down": 0, "steps_up": 0}
    # contention: ages of 45 ms (> 80% of 50 ms) at every rung until the lowest
    assert feed(c, 0.045, 3) == [5, 3, 2] and c.counters["steps_down"] == 3
    assert feed(c, 0.045, 5) == [2] * 5  # nothing below 2
    # calm again: 20 ms + the 1 ms per step of the rung above stays under 60% of the deadline (30 ms),
    # once the slow ages have left the window; then one rung per five calm chunks in a row
    sequence = feed(c, 0.020, 60)
    changes = [i for i in range(1, len(sequence)) if sequence[i] != sequence[i - 1]]
    assert [sequence[i] for i in changes] == [3, 5, 10] and sequence[-1] == 10
    assert changes[0] >= 4 and all(b - a >= 5 for a, b in zip(changes, changes[1:], strict=False))
    assert c.counters == {"steps_down": 3, "steps_up": 3}


def test_between_the_thresholds_nothing_moves():
    """Ages at 70% of the deadline: not enough to step down, too much to climb (hysteresis)."""
    c = StepsController(10, DEADLINE, calm_chunks=3)
    feed(c, 0.045, 1)
    assert c.steps == 5
    assert feed(c, 0.035, 50) == [5] * 50 and c.counters["steps_up"] == 0


def test_a_climb_that_would_not_fit_is_not_made():
    """At 2 steps with 25 ms ages and 2 ms per step: 3 steps would add 2 ms (27 < 30: climb); 5 steps
    from 3 would add 4 ms (29 < 30: climb); 10 from 5 would add 10 ms (35 > 30: stay)."""
    c = StepsController(10, DEADLINE, calm_chunks=2)
    feed(c, 0.045, 3, denoise_ms_per_step=2.0)
    assert c.steps == 2
    assert feed(c, 0.025, 12, denoise_ms_per_step=2.0)[-1] == 5 and c.counters["steps_up"] == 2


def test_chunks_made_before_a_change_do_not_count():
    c = StepsController(10, DEADLINE, calm_chunks=5)
    c.observe(0.045, 10, 10.0)
    assert c.steps == 5
    assert c.observe(0.049, 10, 10.0) == 5  # a 10-step chunk already in flight: not evidence about 5 steps
    assert c.counters["steps_down"] == 1


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="calm"):
        StepsController(10, DEADLINE, pressure=0.5, calm=0.6)


def test_a_frame_overdue_in_flight_steps_the_next_one_down_before_it_arrives():
    """The onset of a load: the frame in flight is already past the pressure threshold when the next
    observation comes; the next frame takes fewer steps at once, and the old frame does not count twice."""
    c = StepsController(10, deadline_s=0.05)
    for _ in range(5):
        c.observe(0.02, 10, 9.0)
    assert c.overdue(0.035, 10) == 10  # in flight, but under 80% of the deadline
    assert c.overdue(0.045, 10) == 5 and c.counters["steps_down"] == 1
    assert c.overdue(0.060, 10) == 5 and c.counters["steps_down"] == 1  # the same old frame: once
    assert c.observe(0.065, 10, 40.0) == 5  # its late chunk, made with 10 steps: no second move
    assert c.overdue(0.041, 5) == 3  # a frame at the new rung overdue too: down again
