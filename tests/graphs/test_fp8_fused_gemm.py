"""The fused FP8 expert GEMMs (graphs/fp8_fused_gemm.py) in Triton's interpreter, against the unfused path.

The interpreter runs the kernel's own code on the CPU. Its float downcasts are not the GPU's: float32 ->
bf16 truncates and float32 -> FP8 loses the carry when rounding up crosses a power of two (triton 3.9,
`interpreter._convert_float`). The fixture replaces those two with torch's round-to-nearest-even casts,
which are what the GPU's conversion instructions do; every other step is the interpreter's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vla_runtime.graphs import fp8, fp8_fused_gemm
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.layers import GemmaRMSNorm, gated_residual
from vla_runtime.graphs.pi0 import time_schedule
from vla_runtime.graphs.weights import build_model

triton = pytest.importorskip("triton")  # in requirements.txt: CI has it


@pytest.fixture
def interpreter(monkeypatch):
    from triton import language as tl
    from triton.runtime import interpreter as triton_interpreter

    if not fp8_fused_gemm.interpreting():  # tests/conftest.py turns it on wherever there is no GPU
        pytest.skip("Triton's interpreter is off on a machine with a GPU; tests/gpu run the kernel there")
    original = triton_interpreter._convert_float
    exact = {tl.bfloat16: (torch.bfloat16, torch.uint16), tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8)}

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in exact:
            dtype, bits = exact[output_dtype]
            as_float = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            return as_float.to(dtype).view(bits).numpy().reshape(values.shape)
        return original(values, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(triton_interpreter, "_convert_float", convert)


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def fp8_linear(n: int, k: int, gen, inputs: torch.Tensor) -> fp8.FP8Linear:
    linear = fp8.FP8Linear((torch.randn(n, k, generator=gen) / k**0.5).bfloat16())
    linear.input_scale.fill_(float(inputs.detach().float().abs().amax()) / fp8.E4M3_MAX)
    return linear


def assert_same(fused: torch.Tensor, unfused: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
    """Equal but for the order of float32 sums (the norm's mean square, the GEMM's K loop): a few
    elements one bf16 step apart at most, a step of `magnitude` (the largest term summed; default the
    value itself)."""
    assert fused.shape == unfused.shape and fused.dtype == unfused.dtype
    diff = (fused.float() - unfused.float()).abs()
    magnitude = unfused.float().abs() if magnitude is None else magnitude
    step = magnitude.clamp(min=2**-8) * 2**-7  # one bf16 step at each value
    assert bool((diff <= step).all()), float((diff / step).max())
    assert float((diff > 0).float().mean()) < 0.02


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive-norm", "plain-norm"])
def test_norm_prologue_and_plain_epilogue_equal_norm_then_fp8_gemm(interpreter, adaptive):
    gen = fresh_generator()
    items, rows, k, n = 2, 50, 64, 96
    hidden = torch.randn(items, rows, k, generator=gen).bfloat16() * 3
    norm = GemmaRMSNorm(k, cond_dim=16 if adaptive else None).bfloat16()
    if adaptive:
        modulation = (torch.randn(items, 3 * k, generator=gen) * 0.5).bfloat16()
    else:
        modulation = None
        norm.weight.data = torch.randn(k, generator=gen).bfloat16() * 0.3
    normed, _ = norm(hidden, modulation)
    linear = fp8_linear(n, k, gen, normed)
    scale, shift, _ = norm.kernel_terms(modulation)
    fused = fp8_fused_gemm.fused_linear(
        linear, hidden, "norm", "plain", "qkv", rows, norm_scale=scale, norm_shift=shift, eps=norm.eps
    )
    assert_same(fused, linear(normed).reshape(items * rows, n))


def test_cast_prologue_and_gated_residual_epilogue(interpreter):
    gen = fresh_generator()
    items, rows, k, n = 3, 50, 128, 64
    x = torch.randn(items * rows, k, generator=gen).bfloat16()
    residual = torch.randn(items * rows, n, generator=gen).bfloat16()
    gate = torch.randn(items, n, generator=gen).bfloat16()
    linear = fp8_linear(n, k, gen, x)
    fused = fp8_fused_gemm.fused_linear(
        linear, x, "cast", "residual", "o", rows, residual=residual, gate=gate
    )
    update = linear(x).float() * gate.float().repeat_interleave(rows, 0)
    unfused = (residual.float() + update).bfloat16()
    assert_same(fused, unfused, magnitude=residual.float().abs() + update.abs())


def test_norm_prologue_geglu_epilogue_then_fp8_prologue_residual(interpreter):
    """The MLP as the fused path runs it: gate/up with the norm and GeGLU (FP8 out), down with the
    residual, against the unfused norm, FP8 gate/up, gelu * up, FP8 down and the gated residual."""
    gen = fresh_generator()
    items, rows, width, mlp = 2, 10, 64, 128
    hidden = torch.randn(items, rows, width, generator=gen).bfloat16()
    norm = GemmaRMSNorm(width, cond_dim=8).bfloat16()
    modulation = (torch.randn(items, 3 * width, generator=gen) * 0.5).bfloat16()
    normed, gate = norm(hidden, modulation)
    gate_up = fp8_linear(2 * mlp, width, gen, normed)
    g, u = gate_up(normed).chunk(2, dim=-1)
    geglu = F.gelu(g, approximate="tanh") * u
    down = fp8_linear(width, mlp, gen, geglu)
    unfused = gated_residual(hidden, down(geglu), gate).reshape(-1, width)

    scale, shift, gate_terms = norm.kernel_terms(modulation)
    hidden_fp8 = fp8_fused_gemm.fused_linear(
        gate_up, hidden, "norm", "geglu", "gate_up", rows,
        out_scale=down.input_scale, norm_scale=scale, norm_shift=shift, eps=norm.eps,
    )  # fmt: skip
    assert hidden_fp8.dtype == torch.float8_e4m3fn and hidden_fp8.shape == (items * rows, mlp)
    # The kernel applies the GeGLU to its float32 accumulators, as graphs/fp8_geglu.py does (the unfused
    # path rounds gate and up to bf16 first): against that, the FP8 result is exact but for a neighbour
    # where a float32 sum's order tips the rounding.
    x_fp8 = gate_up.quantize(normed).float()
    g32, u32 = (x_fp8 @ gate_up.weight_fp8.float() * gate_up.input_scale * gate_up.weight_scale).chunk(2, -1)
    exact_fp8 = down.quantize(F.gelu(g32, approximate="tanh") * u32).float()
    assert float((hidden_fp8.float() != exact_fp8).float().mean()) < 0.01
    assert float((hidden_fp8.float() - exact_fp8).abs().max()) <= float(exact_fp8.abs().max()) / 8
    fused = fp8_fused_gemm.fused_linear(
        down, hidden_fp8, "fp8", "residual", "down", rows, residual=hidden, gate=gate_terms
    )
    update = down.matmul(hidden_fp8, hidden.shape[:-1]).float() * gate.float()
    same_input = (hidden.float() + update).reshape(-1, width)
    magnitude = (hidden.float().abs() + update.abs()).reshape(-1, width)
    assert_same(fused, same_input.bfloat16(), magnitude)
    rel = float((fused.float() - unfused.float()).norm() / unfused.float().norm())
    assert rel < 0.03  # the whole MLP against the unfused one: within FP8's rounding


@pytest.mark.parametrize("preset", ["pi05_tiny", "pi0_tiny"])
@torch.inference_mode()
def test_fused_denoising_loop_runs_every_expert_gemm_fused_and_matches_the_unfused_loop(
    interpreter, monkeypatch, preset
):
    cfg = get_preset(preset)
    model = build_model(cfg, seed=int(torch.randint(0, 1000, ()))).set_precision(torch.bfloat16)
    gen = fresh_generator()
    kv = torch.randn(cfg.expert.depth, 2, 1, 1, cfg.prefix_len, cfg.expert.head_dim, generator=gen).bfloat16()
    mask = torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    mask[:, -5:] = False
    times, dt = time_schedule(cfg.default_steps)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=gen)
    state = torch.randn(1, cfg.action_dim, generator=gen)
    run = lambda: model.denoise(kv, mask, state, noise, torch.from_numpy(times), dt)  # noqa: E731
    reference = run()  # bf16 GEMMs
    fp8.quantize_stack(model.expert)
    model.expert.set_quantized(True)
    fp8.calibrate(fp8.fp8_modules(model.expert), run)
    unfused = run()

    calls = []
    real = fp8_fused_gemm.fused_linear
    monkeypatch.setattr(
        "vla_runtime.graphs.gemma.fused_linear", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw)
    )
    for layer in model.expert.layers:
        layer.fused_fp8_gemms = True
    fused = run()
    steps = cfg.default_steps
    assert sorted(set(calls)) == ["geglu", "plain", "residual"]
    assert len(calls) == 4 * cfg.expert.depth * steps
    cos = F.cosine_similarity(fused.flatten(), unfused.flatten(), dim=0)
    assert cos > 0.999 and not torch.equal(fused, unfused)  # the fused kernels really ran
    # The fused GeGLU skips a bf16 rounding of gate and up: no further from the bf16 GEMMs than unfused.
    error = {name: float((out - reference).norm()) for name, out in (("fused", fused), ("unfused", unfused))}
    assert error["fused"] <= 1.25 * error["unfused"] + 1e-3 * float(reference.norm()), error


def test_bad_shapes_are_named_and_the_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = fp8_fused_gemm.available("cpu")
    assert not ok and "CUDA" in why
    linear = fp8.FP8Linear(torch.randn(32, 64).bfloat16())
    x = torch.randn(10, 64).bfloat16()
    with pytest.raises(RuntimeError, match="fp8_fused_gemm: .*CUDA"):
        fp8_fused_gemm.fused_linear(linear, x, "cast", "plain", "o", 10)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as tests/conftest.py set it before Triton was imported
    with pytest.raises(ValueError, match="whole items of 3"):
        fp8_fused_gemm.fused_linear(linear, x, "cast", "plain", "o", 3)
    with pytest.raises(ValueError, match="residual"):
        fp8_fused_gemm.fused_linear(linear, x, "cast", "residual", "o", 10)
    with pytest.raises(ValueError, match="prologue fp8"):
        fp8_fused_gemm.fused_linear(linear, x, "fp8", "plain", "o", 10)
    with pytest.raises(ValueError, match="norm_scale"):
        fp8_fused_gemm.fused_linear(linear, x, "norm", "plain", "o", 10)
