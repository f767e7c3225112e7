"""The GPU tier: full-size presets on a CUDA device. Run with `pytest -m gpu tests/gpu` on a CUDA machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ..conftest import random_observation


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:  # the hook sees the whole session's items: mark only this folder's
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA GPU (CI runs only the CPU tier: -m 'not gpu and not bench')")
    return torch.device("cuda")


def worst_relative_difference(policy, reference, rng: np.random.Generator, frames: int = 3) -> float:
    """The largest |policy - reference| over fresh pi05 frames and noise, relative to the reference's
    largest action."""
    cfg = reference.config.model
    worst = 0.0
    for _ in range(frames):
        obs = random_observation(rng, "pi05", side=224)
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        want = reference.infer(obs, noise).actions
        worst = max(worst, float(np.abs(policy.infer(obs, noise).actions - want).max() / np.abs(want).max()))
    return worst
