"""ObservationAssembler on a fake clock: matching by stamp, dead optional cameras, future stamps, resets."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.nodes.assembler import AssemblySettings, InputRefused, ObservationAssembler

SETTINGS = AssemblySettings(
    required_cameras=("base", "wrist"), optional_cameras=("right",), sync_tolerance_s=0.02, max_obs_age_s=0.5
)


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


def publish(a: ObservationAssembler, stamp: float, now: float, cameras=("base", "wrist", "right")):
    for camera in cameras:
        a.add_image(camera, image(int(stamp * 100) % 256), stamp, now)
    a.add_state(np.full(3, stamp, dtype=np.float32), stamp, now)


def test_complete_when_the_last_part_arrives_and_only_once():
    a = ObservationAssembler(SETTINGS)
    a.set_instruction("pick up the bowl")
    a.add_image("base", image(1), 1.0, now=1.0)
    a.add_image("wrist", image(2), 1.0, now=1.0)
    assert a.take(1.0) is None and "state" in a.waiting_for
    a.add_state(np.zeros(3, np.float32), 1.0, now=1.001)
    obs = a.take(1.001)
    assert obs.timestamp == 1.0 and set(obs.images) == {"base", "wrist"} and obs.instruction
    assert a.take(1.002) is None and a.waiting_for == "nothing new"


def test_parts_are_matched_by_stamp_within_the_tolerance():
    a = ObservationAssembler(SETTINGS)
    a.set_instruction("x")
    rng = np.random.default_rng()
    t0 = rng.uniform(0, 100)
    for k in range(5):  # the wrist camera runs 12 ms behind the base camera; the state at 100 Hz
        a.add_image("base", image(k), t0 + k / 30, now=t0 + k / 30)
        a.add_image("wrist", image(100 + k), t0 + k / 30 - 0.012, now=t0 + k / 30)
    for k in range(15):
        a.add_state(np.full(3, k, np.float32), t0 + k / 100, now=t0 + k / 100)
    obs = a.take(t0 + 0.15)
    # the reference is the oldest of the newest stamps (the wrist's), each part the nearest to it
    assert obs.timestamp == pytest.approx(t0 + 4 / 30 - 0.012)
    assert obs.images["wrist"][0, 0, 0] == 104 and obs.images["base"][0, 0, 0] == 4
    assert obs.state[0] == 12  # t0 + 0.12 is nearest to t0 + 0.1213
    b = ObservationAssembler(SETTINGS)
    b.set_instruction("x")
    b.add_image("base", image(0), 1.0, now=1.0)
    b.add_image("wrist", image(0), 1.05, now=1.05)  # 50 ms apart: never the same moment
    b.add_state(np.zeros(3, np.float32), 1.05, now=1.05)
    assert b.take(1.05) is None and b.waiting_for.startswith("wrist not synchronised")


def test_a_dead_optional_camera_is_masked_out_instead_of_blocking():
    a = ObservationAssembler(SETTINGS)
    a.set_instruction("x")
    publish(a, 1.0, 1.0)
    assert set(a.take(1.0).images) == {"base", "wrist", "right"}
    for k in range(1, 12):  # the right camera died after 1.0; the others keep publishing at 20 Hz
        t = 1.0 + k * 0.05
        publish(a, t, t, cameras=("base", "wrist"))
        obs = a.take(t)
        if t - 1.0 <= 0.5:
            assert obs is None  # alive until max_obs_age_s: waited for, not fed stale
        else:
            assert obs.timestamp == pytest.approx(t) and set(obs.images) == {"base", "wrist"}


def test_future_stamps_are_refused_and_stale_inputs_are_not_served():
    a = ObservationAssembler(SETTINGS)
    a.set_instruction("x")
    with pytest.raises(InputRefused, match="header.stamp: 0.300 s ahead") as refused:
        a.add_image("base", image(0), 10.3, now=10.0)
    assert refused.value.cause == "future_stamps"
    publish(a, 10.0, 10.0)
    assert a.take(10.6) is None and a.waiting_for == "stale"


def test_a_source_going_back_in_time_and_reset():
    a = ObservationAssembler(SETTINGS)
    a.set_instruction("x")
    publish(a, 50.0, 50.0)
    assert a.take(50.0) is not None
    a.reset()  # the clock jumped back: everything buffered is from the old timeline
    publish(a, 2.0, 2.0)
    assert a.take(2.0).timestamp == 2.0
    a.add_image("wrist", image(9), 1.95, now=2.0)  # out of order: dropped, the 2.0 image stays newest
    assert a.take(2.0) is None and a.waiting_for == "nothing new"
    a.add_image("wrist", image(9), 0.5, now=2.0)  # far back: the source restarted, its history is void
    assert a.take(2.0) is None and a.waiting_for == "stale"


def test_a_fast_state_is_matched_to_late_images():
    """Joint states at 500 Hz, camera images arriving 80 ms after they were taken: the state history
    reaches back far enough (it is kept by time, not by count)."""
    a = ObservationAssembler(SETTINGS)
    a.set_instruction("x")
    for k in range(100):  # 0.2 s of state
        a.add_state(np.full(3, k, np.float32), 1.0 + k * 0.002, now=1.0 + k * 0.002)
    a.add_image("base", image(1), 1.118, now=1.198)
    a.add_image("wrist", image(2), 1.118, now=1.198)
    obs = a.take(1.198)
    assert obs is not None and obs.timestamp == pytest.approx(1.118) and obs.state[0] == 59
