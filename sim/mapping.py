"""LIBERO <-> policy, as openpi's LIBERO example maps them: the agent view is the base camera, the wrist
camera the left wrist, the right wrist is absent (masked); the state is eef position + axis-angle +
gripper (8); the first 7 action dims are LIBERO's action."""

from __future__ import annotations

import numpy as np

from ..runtime.types import Observation

CAMERA_MAP = {"base_0_rgb": "agentview", "left_wrist_0_rgb": "wrist"}
STATE_DIM = 8
ACTION_DIM = 7


def to_observation(sim_obs: dict, timestamp: float) -> Observation:
    images = {camera: sim_obs[key] for camera, key in CAMERA_MAP.items()}
    return Observation(
        images, np.asarray(sim_obs["state"], dtype=np.float32), sim_obs["instruction"], timestamp
    )


def to_libero_action(action: np.ndarray) -> np.ndarray:
    action = np.asarray(action, dtype=np.float32)
    if action.shape[-1] < ACTION_DIM:
        raise ValueError(f"action: {action.shape[-1]} dims, LIBERO needs {ACTION_DIM}")
    return action[:ACTION_DIM]
