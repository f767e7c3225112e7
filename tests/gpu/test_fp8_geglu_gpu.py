"""The fused FP8 gate/up + GeGLU + cast kernel (graphs/fp8_geglu.py) against the two-kernel path it
replaces (cuBLAS FP8 GEMM, then GeGLU and the cast), inside a Gemma MLP, on fresh random weights and
inputs, at the prefix's and the action expert's shapes and at an odd row count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vla_runtime.graphs import fp8
from vla_runtime.graphs.config import GemmaConfig
from vla_runtime.graphs.gemma import GemmaStack


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("rows, width, mlp_dim", [(968, 2048, 16384), (50, 1024, 4096), (37, 512, 1024)])
@torch.inference_mode()
def test_fused_geglu_matches_the_two_kernel_path(cuda, rows, width, mlp_dim):
    seed = int(np.random.default_rng().integers(2**31))
    torch.manual_seed(seed)
    cfg = GemmaConfig(width=width, depth=1, mlp_dim=mlp_dim, num_heads=2, num_kv_heads=1, head_dim=256)
    stack = GemmaStack(cfg).to(cuda, torch.bfloat16)
    stack.fuse()
    fp8.quantize_stack(stack)
    mlp = stack.layers[0].mlp
    assert mlp.fused_geglu, "the fused kernel should be available on a CUDA GPU with Triton"
    x = torch.randn(1, rows, width, device=cuda, dtype=torch.bfloat16)
    reference = mlp(x)  # bf16 weights, no FP8
    mlp.quant_enabled = True
    fp8.calibrate(fp8.fp8_modules(stack), lambda: mlp(x))
    fused = mlp(x)
    mlp.fused_geglu = False
    two_kernels = mlp(x)
    assert fused.shape == x.shape and fused.dtype == torch.bfloat16 and torch.isfinite(fused).all()
    err_fused, err_two = rel_l2(fused, reference), rel_l2(two_kernels, reference)
    print(f"\nseed {seed}: rel L2 vs bf16, fused {err_fused:.4f}, two kernels {err_two:.4f}")
    # Both quantise for real (e4m3 has 3 mantissa bits); the fused kernel rounds once less (its GeGLU
    # reads float32 accumulators, not bf16), so it may not be worse.
    assert 1e-3 < err_fused < 0.08, f"seed {seed}"
    assert err_fused <= err_two * 1.05 + 1e-3, f"seed {seed}"
    assert rel_l2(fused, two_kernels) < 0.05, f"seed {seed}"


@pytest.mark.parametrize("rows, out_rows", [(50, 64), (200, 256), (130, 200)])
@torch.inference_mode()
def test_padded_output_rows_are_zeros_after_the_rows_computed(cuda, rows, out_rows):
    """`out_rows` (the down GEMM's padded rows, graphs/fp8.EXPERT_ROW_PADDING): the first M rows as
    without it, bit for bit, and the rest zeros, for few rows and for many (the autotuned configurations),
    with out_rows a multiple of the row block or not."""
    from vla_runtime.graphs.fp8_geglu import fp8_geglu

    seed = int(np.random.default_rng().integers(2**31))
    torch.manual_seed(seed)
    x = torch.randn(rows, 1024, device=cuda).to(torch.float8_e4m3fn)
    w = (0.1 * torch.randn(2 * 4096, 1024, device=cuda)).to(torch.float8_e4m3fn)
    one = torch.ones((), device=cuda)
    plain = fp8_geglu(x, w, one, one, one)
    # the output's block freed full of 0xFF first, so zero rows are the kernel's, not a fresh block's
    torch.full((out_rows, 4096), 0xFF, dtype=torch.uint8, device=cuda)
    padded = fp8_geglu(x, w, one, one, one, out_rows)
    assert plain.shape == (rows, 4096) and padded.shape == (out_rows, 4096), seed
    assert torch.equal(padded[:rows].view(torch.uint8), plain.view(torch.uint8)), seed
    assert not padded[rows:].view(torch.uint8).any(), seed
    with pytest.raises(ValueError, match=f"out_rows {rows - 10} below the {rows} rows"):
        fp8_geglu(x, w, one, one, one, rows - 10)
