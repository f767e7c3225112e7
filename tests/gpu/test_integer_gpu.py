"""int8 and w4a8 on the GPU with pi05: the captured, compiled executor against the eager reference in the
same mode, and the mode's accuracy gates against float32 (runtime/accuracy.py)."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.runtime.accuracy import accuracy_table
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation
from .test_executor_gpu import BF16_REL_TOL


@pytest.mark.parametrize("precision", ["int8", "w4a8"])
def test_integer_modes_in_graphs_equal_the_eager_reference_and_pass_their_gates(cuda, precision, rng):
    config = RuntimeConfig(preset="pi05", device="cuda", precision=precision)
    with PipelinedExecutor(config) as executor:
        assert executor.use_graphs and executor.counters["captures"] > 0
        reference = EagerPolicy(parts=executor.parts)
        cfg = config.model
        for _ in range(3):
            obs = random_observation(rng, "pi05", side=224)
            noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
            got = executor.infer(obs, noise).actions
            want = reference.infer(obs, noise).actions
            worst = np.abs(got - want).max() / np.abs(want).max()
            assert worst <= BF16_REL_TOL, worst
        table = accuracy_table(config, frames=2, candidate=executor.parts)
    print({r["name"]: round(r["cosine"], 5) for r in table["rows"] if r["gate"]})
    assert table["passed"]
