"""The guided denoising loops (inpaint, rtc) captured in CUDA graphs, compiled, against the eager
reference on the same weights: fresh random inputs, a random delay."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.handover import PreviousChunk
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation
from .test_executor_gpu import BF16_REL_TOL


@pytest.mark.parametrize("mode", ["inpaint", "rtc"])
def test_the_guided_loop_in_graphs_equals_the_eager_reference(cuda, mode):
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", device="cuda", precision="bf16", handover=mode))
    cfg = parts.config
    reference = EagerPolicy(parts=parts)
    with PipelinedExecutor(parts=parts) as executor:
        assert executor.use_graphs and executor.counters["captures"] > 0
        for _ in range(4):
            obs = random_observation(rng, "pi05_tiny", side=224)
            noise = rng.standard_normal((cfg.model.action_horizon, cfg.model.action_dim), dtype=np.float32)
            old = rng.uniform(-1, 1, (cfg.model.chunk_length, cfg.robot_action_dim)).astype(np.float32)
            previous = PreviousChunk(old, int(rng.integers(1, 4)))
            got = executor.infer(obs, noise, previous).actions
            want = reference.infer(obs, noise, previous).actions
            np.testing.assert_array_equal(got[: previous.delay_steps], old[: previous.delay_steps])
            worst = np.abs(got - want).max() / np.abs(want).max()
            assert worst <= BF16_REL_TOL, worst
