"""LIBERO <-> policy mapping and the server's state conversion (pure numpy: checked in this environment)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from vla_runtime.sim.libero_env import quat_to_axis_angle
from vla_runtime.sim.mapping import to_libero_action, to_observation


def test_quaternion_to_axis_angle():
    np.testing.assert_allclose(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    half = math.pi / 4  # 90 degrees about z: (x, y, z, w) = (0, 0, sin 45, cos 45)
    np.testing.assert_allclose(
        quat_to_axis_angle(np.array([0.0, 0.0, math.sin(half), math.cos(half)])),
        [0.0, 0.0, math.pi / 2],
        atol=1e-9,
    )
    np.testing.assert_allclose(
        quat_to_axis_angle(np.array([1.0, 0.0, 0.0, 0.0])), [math.pi, 0.0, 0.0], atol=1e-9
    )


def test_observation_and_action_mapping(rng):
    sim_obs = {
        "agentview": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "state": rng.normal(size=8).astype(np.float32),
        "instruction": "open the drawer",
    }
    obs = to_observation(sim_obs, 12.5)
    assert (
        obs.images["base_0_rgb"] is sim_obs["agentview"]
        and obs.images["left_wrist_0_rgb"] is sim_obs["wrist"]
    )
    assert (
        "right_wrist_0_rgb" not in obs.images
        and obs.timestamp == 12.5
        and obs.instruction == "open the drawer"
    )
    action = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(to_libero_action(action), action[:7])
    with pytest.raises(ValueError, match="action: 5 dims"):
        to_libero_action(np.zeros(5))
