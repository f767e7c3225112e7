"""Synthetic observations: random frames and state with a LIBERO-style instruction, for demos,
benchmarks and FP8 calibration when no recorded frames are given."""

from __future__ import annotations

import time

import numpy as np

from .config import RuntimeConfig
from .types import Observation

INSTRUCTIONS = (
    "put the black bowl on the plate",
    "open the top drawer of the cabinet",
    "pick up the ketchup and place it in the basket",
    "turn on the stove",
)


def synthetic_observation(
    config: RuntimeConfig, rng: np.random.Generator, image_side: int = 224
) -> Observation:
    images = {
        name: rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
        for name in config.model.camera_names
        if name not in config.optional_camera_names
    }
    state = rng.uniform(-1, 1, config.state_dim).astype(np.float32)
    return Observation(images, state, INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))], time.time())
