"""Precision on the GPU, full pi05, fresh random inputs: FP16 vision and the FP8 prefix inside their
accuracy gates against float32, and the FP8 executor (graphs) against the FP8 eager reference."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from vla_runtime.runtime.accuracy import accuracy_table, format_table
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation


@pytest.mark.parametrize(
    "precision, vision, fp8_expert",
    [("bf16", "fp16", False), ("fp8", "fp16", False), ("fp8", "fp16", True), ("bf16", None, False)],
)
def test_accuracy_gates(cuda, precision, vision, fp8_expert):
    seed = int(np.random.default_rng().integers(2**31))  # fresh random weights (and inputs) every run
    config = RuntimeConfig(
        preset="pi05",
        device="cuda",
        precision=precision,
        vision_precision=vision,
        fp8_expert=fp8_expert,
        seed=seed,
    )
    result = accuracy_table(config, frames=3)
    print(f"\nweights seed {seed}\n" + format_table(result))
    if precision == "fp8":  # FP8 really ran: its keys and values differ from float32 more than bf16's do
        kv = [r["rel_l2"] for r in result["rows"] if r["name"].startswith("prefix.")]
        assert max(kv) > 1.5e-2
    gc.collect()
    torch.cuda.empty_cache()
    assert result["passed"], f"weights seed {seed}\n" + format_table(result)


def test_fp8_executor_matches_fp8_reference(cuda):
    executor = PipelinedExecutor(
        RuntimeConfig(preset="pi05", device="cuda", precision="fp8", vision_precision="fp16", fp8_expert=True)
    )
    reference = EagerPolicy(parts=executor.parts)
    for stack in (executor.parts.model.prefix_lm, executor.parts.model.expert):
        layer = stack.layers[0]
        assert (
            layer.self_attn.quant_enabled and layer.mlp.quant_enabled and layer.mlp.gate_up_quant is not None
        )
    rng = np.random.default_rng()
    worst = 0.0
    try:
        for _ in range(10):
            obs = random_observation(rng, "pi05", side=224)
            noise = rng.standard_normal((50, 32), dtype=np.float32)
            a, b = executor.infer(obs, noise).actions, reference.infer(obs, noise).actions
            worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    finally:
        executor.close()
    print(f"fp8 executor vs fp8 eager: worst relative difference {worst:.2e}")
    assert worst <= 5e-2
