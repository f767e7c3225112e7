"""The split-K FP8 kernel for few rows (graphs/fp8_skinny.py): against float32 products of the same FP8
operands, with FP8 and bf16 inputs, at the action expert's shapes and odd row counts; and a whole expert
layer with it against the same layer on cuBLAS, on fresh random weights and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vla_runtime.graphs import fp8, fp8_skinny
from vla_runtime.graphs.config import GemmaConfig
from vla_runtime.graphs.gemma import GemmaStack
from vla_runtime.graphs.layers import rope_cos_sin

E4M3_MAX = 448.0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fresh_seed() -> int:
    seed = int(np.random.default_rng().integers(2**31))
    torch.manual_seed(seed)
    return seed


@pytest.mark.parametrize("n, k", [(2560, 1024), (1024, 2048), (1024, 4096), (8192, 1024)])
@pytest.mark.parametrize("rows", [1, 10, 50, 80, 128])
@pytest.mark.parametrize("input_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@torch.inference_mode()
def test_split_k_equals_the_float32_product_of_its_fp8_operands(cuda, rows, n, k, input_dtype):
    seed = fresh_seed()
    x = torch.randn(rows, k, device=cuda, dtype=torch.bfloat16) * 3
    w = torch.randn(n, k, device=cuda) / k**0.5
    x_scale = (x.float().abs().amax() / E4M3_MAX).reshape(())
    w_scale = (w.abs().amax() / E4M3_MAX).reshape(())
    w8 = (w / w_scale).to(torch.float8_e4m3fn)
    x8 = (x.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # FP8Linear.quantize
    want = (x8.double() @ w8.double().t()) * float(x_scale) * float(w_scale)
    assert fp8_skinny.supports(rows, n, k)
    partials = fp8_skinny.fp8_split_k(x8 if input_dtype == torch.float8_e4m3fn else x, w8, x_scale, w_scale)
    assert partials.dtype == torch.float32 and partials.shape[1:] == (rows, n)
    got = fp8_skinny.sum_of_slices(partials)
    assert torch.isfinite(got).all(), f"seed {seed}"
    # float32 accumulation of exact FP8 products: only the order of the sums differs. A bf16 input is cast
    # in the kernel; a value halfway between two e4m3 values may round the other way.
    tolerance = 1e-5 if input_dtype == torch.float8_e4m3fn else 2e-3
    assert rel_l2(got, want) < tolerance, f"seed {seed}: {rel_l2(got, want)}"


@pytest.mark.parametrize("rows", [10, 50, 100])
@torch.inference_mode()
def test_an_expert_layer_on_split_k_matches_it_on_cublas(cuda, rows):
    """pi05's action expert shape (width 1024, 8 heads of 256, MLP 4096), one layer with its adaptive
    norms: q/k/v, the output projection (its bf16 input cast in the kernel), gate/up and down."""
    seed = fresh_seed()
    cfg = GemmaConfig(width=1024, depth=1, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
    stack = GemmaStack(cfg, adaptive=True).to(cuda, torch.bfloat16)
    stack.fuse()
    fp8.quantize_stack(stack)
    modules = fp8.fp8_modules(stack)
    assert all(m.split_k for m in modules.values()), "the split-K kernel should be on with CUDA and Triton"
    assert modules["layers.0.o"].cast_in_kernel and not modules["layers.0.qkv"].cast_in_kernel
    layer = stack.layers[0]
    hidden = torch.randn(1, rows, cfg.width, device=cuda, dtype=torch.bfloat16)
    mods = stack.modulations(torch.randn(1, cfg.width, device=cuda, dtype=torch.bfloat16))
    positions = torch.arange(rows, device=cuda)[None]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, 10_000.0, torch.bfloat16)
    attention = torch.randn(1, rows, cfg.num_heads * cfg.head_dim, device=cuda, dtype=torch.bfloat16)

    def run():
        q, k, v, gate = layer.qkv(hidden, cos, sin, mods[0])
        return q, k, v, layer.finish(hidden, attention, gate, mods[1])  # `attention` stands for it

    stack.set_quantized(True)
    fp8.calibrate(modules, run)
    for m in modules.values():
        m.split_k = False
    cublas = run()
    for m in modules.values():
        m.split_k = True
    split = run()
    for got, want, name in zip(split, cublas, ("q", "k", "v", "layer output"), strict=True):
        assert torch.isfinite(got).all(), f"seed {seed}: {name}"
        # The same FP8 operands; the outputs differ by float32 summation order and bf16 rounding.
        assert rel_l2(got, want) < 1e-2, f"seed {seed}: {name} {rel_l2(got, want)}"
