"""The fused FP8 expert GEMMs (graphs/fp8_fused_gemm.py) on the GPU: a full-size pi0.5 expert layer with
them against the same layer unfused and against its bf16 GEMMs, on fresh random weights and inputs, for
one robot (50 rows) and a batch of eight (400 rows)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vla_runtime.graphs import fp8
from vla_runtime.graphs.config import GEMMA_300M
from vla_runtime.graphs.gemma import GemmaStack
from vla_runtime.graphs.layers import rope_cos_sin


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("items", [1, 8])
@torch.inference_mode()
def test_fused_expert_layer_matches_the_unfused_one(cuda, items):
    seed = int(np.random.default_rng().integers(2**31))
    torch.manual_seed(seed)
    cfg, rows = GEMMA_300M, 50
    stack = GemmaStack(dataclasses.replace(cfg, depth=1), adaptive=True).to(cuda, torch.bfloat16)
    stack.fuse()
    layer = stack.layers[0]
    hidden = torch.randn(items, rows, cfg.width, device=cuda, dtype=torch.bfloat16)
    mod_in, mod_post = (
        torch.randn(items, 3 * cfg.width, device=cuda, dtype=torch.bfloat16) * 0.3 for _ in "ab"
    )
    cos, sin = rope_cos_sin(
        torch.arange(rows, device=cuda)[None].expand(items, -1), cfg.head_dim, 10_000.0, torch.bfloat16
    )

    def run():
        q, k, v, gate = layer.qkv(hidden, cos, sin, mod_in)
        attn_out = (
            torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.expand(-1, q.shape[2], -1, -1), v.expand(-1, q.shape[2], -1, -1)
            )
            .transpose(1, 2)
            .reshape(items, rows, -1)
        )
        return q, k, layer.finish(hidden, attn_out, gate, mod_post)

    reference = run()  # bf16 GEMMs
    fp8.quantize_stack(stack)
    stack.set_quantized(True)
    fp8.calibrate(fp8.fp8_modules(stack), run)
    unfused = run()
    layer.fused_fp8_gemms = True
    assert layer.runs_fused_fp8
    fused = run()
    for name, f, u, r in zip(("q", "k", "output"), fused, unfused, reference, strict=True):
        err_fused, err_unfused = rel_l2(f, r), rel_l2(u, r)
        print(f"seed {seed} {name}: rel L2 vs bf16, fused {err_fused:.4f}, unfused {err_unfused:.4f}")
        assert rel_l2(f, u) < 0.03, (seed, name)
        assert err_fused <= 1.1 * err_unfused + 1e-3, (seed, name)
