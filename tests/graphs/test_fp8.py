"""FP8 prefix and action-expert GEMMs (torch._scaled_mm also runs on the CPU, so the numerics are
checked in CI; the speed and the GPU gates are in tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from vla_runtime.graphs import fp8, fp8_geglu
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.pi0 import time_schedule
from vla_runtime.graphs.weights import build_model


def test_fp8_linear_against_float_matmul():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = torch.randn(96, 128, generator=gen).bfloat16()
    x = torch.randn(5, 7, 128, generator=gen).bfloat16()
    layer = fp8.FP8Linear(w)
    layer.input_scale.fill_(float(x.abs().amax()) / fp8.E4M3_MAX)
    out = layer(x)
    assert out.shape == (5, 7, 96) and out.dtype == torch.bfloat16
    y, ref = out.float(), x.float() @ w.float().t()
    rel = float((y - ref).norm() / ref.norm())
    assert 1e-3 < rel < 0.06  # e4m3: 3 mantissa bits; quantised for real, within its rounding
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.FP8Linear(torch.randn(10, 128))


def prefix_run(model, cfg, gen):
    tokens = torch.randn(1, cfg.image_tokens, cfg.prefix_lm.width, generator=gen).bfloat16()
    ids = torch.randint(0, 300, (1, cfg.max_token_len), generator=gen)
    masks = torch.arange(cfg.max_token_len)[None] < 40
    return lambda: model.fill_prefix(tokens, torch.ones(1, cfg.num_views, dtype=torch.bool), ids, masks)[0]


@torch.inference_mode()
def test_quantized_prefix_within_gate_and_calibration_round_trip(tmp_path):
    cfg = get_preset("pi05_tiny")
    model = build_model(cfg, seed=3).set_precision(torch.bfloat16)
    run = prefix_run(model, cfg, torch.Generator().manual_seed(4))
    reference = run().float()
    # the last layer runs only its q/k/v GEMM: its other three are never quantised
    assert fp8.quantize_prefix(model.prefix_lm) == 4 * cfg.prefix_lm.depth - 3
    model.prefix_lm.set_quantized(True)
    scales = fp8.calibrate_prefix(model.prefix_lm, run)
    assert len(scales) == 4 * cfg.prefix_lm.depth - 3 and all(v > 1e-6 for v in scales.values())
    quantized = run().float()
    cos = torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0)
    assert cos >= 0.99 and (quantized - reference).abs().max() > 0  # FP8 really ran, inside the gate
    path = fp8.save_calibration(model.prefix_lm, tmp_path / "fp8_scales.safetensors")
    first = next(iter(fp8.fp8_modules(model.prefix_lm).values()))
    saved = float(first.input_scale)
    first.input_scale.fill_(123.0)
    fp8.load_calibration(model.prefix_lm, path)
    assert float(first.input_scale) == saved
    from safetensors.torch import load_file, save_file

    name = next(iter(fp8.fp8_modules(model.prefix_lm)))
    for bad, message in ((float("nan"), "must be one finite number"), (0.0, "must be positive, got 0.0")):
        tensors = load_file(str(path))
        tensors[f"{name}.input_scale"] = torch.tensor([bad])
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=f"{name}.input_scale {message}"):
            fp8.load_calibration(model.prefix_lm, tmp_path / "bad.safetensors")
        assert float(first.input_scale) == saved  # nothing loaded from a refused file
    fresh = build_model(cfg, seed=3).set_precision(torch.bfloat16)
    with pytest.raises(ValueError, match="quantize the stack first"):
        fresh.prefix_lm.set_quantized(True)


@torch.inference_mode()
def test_quantized_expert_over_the_denoising_loop(tmp_path):
    """Every expert GEMM in FP8, one activation scale per GEMM for all steps, inside the 0.99 gate."""
    cfg = get_preset("pi05_tiny")
    model = build_model(cfg, seed=5).set_precision(torch.bfloat16)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    kv, mask = prefix_run(model, cfg, gen)(), torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    times, dt = time_schedule(cfg.default_steps)
    noise, state = (
        torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=gen),
        torch.zeros(1, cfg.action_dim),
    )
    run = lambda: model.denoise(kv, mask, state, noise, torch.from_numpy(times), dt)  # noqa: E731
    reference = run()
    assert fp8.quantize_stack(model.expert) == 4 * cfg.expert.depth  # no layer skips its MLP here
    model.expert.set_quantized(True)
    modules = fp8.fp8_modules(model.expert, prefix="expert.")
    scales = fp8.calibrate(modules, run)
    assert sorted(scales) == sorted(modules) and all(k.startswith("expert.layers.") for k in scales)
    quantized = run()
    cos = torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0)
    assert cos >= 0.99 and (quantized - reference).abs().max() > 0
    path = fp8.save_calibration(modules, tmp_path / "scales.safetensors")
    first = next(iter(modules.values()))
    saved, _ = float(first.input_scale), first.input_scale.fill_(7.0)
    fp8.load_calibration(modules, path)
    assert float(first.input_scale) == saved
    with pytest.raises(ValueError, match="missing scales"):
        fp8.load_calibration({**modules, "expert.layers.99.qkv": first}, path)


def test_fused_geglu_kernel_needs_cuda_and_the_mlp_keeps_its_two_kernel_path_elsewhere():
    ok, why = fp8_geglu.available("cpu")
    assert not ok and "CUDA" in why
    x = torch.zeros(4, 256).to(torch.float8_e4m3fn)
    w = torch.zeros(64, 256).to(torch.float8_e4m3fn)
    one = torch.ones(())
    with pytest.raises(RuntimeError, match="fp8_geglu: .*CUDA"):
        fp8_geglu.fp8_geglu(x, w, one, one, one)
    model = build_model(get_preset("pi05_tiny"), seed=5).set_precision(torch.bfloat16)
    fp8.quantize_stack(model.expert)
    assert not any(layer.mlp.fused_geglu for layer in model.expert.layers)


def fp8_expert_loop(seed: int):
    """pi05_tiny's denoising loop over a fixed prefix with every expert GEMM in FP8, calibrated on it:
    (config, model, run() -> actions, the generator that drew the inputs)."""
    cfg = get_preset("pi05_tiny")
    model = build_model(cfg, seed=seed).set_precision(torch.bfloat16)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    kv, mask = prefix_run(model, cfg, gen)(), torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    times, dt = time_schedule(cfg.default_steps)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=gen)
    state = torch.randn(1, cfg.action_dim, generator=gen)
    run = lambda: model.denoise(kv, mask, state, noise, torch.from_numpy(times), dt)  # noqa: E731
    fp8.quantize_stack(model.expert)
    model.expert.set_quantized(True)
    fp8.calibrate(fp8.fp8_modules(model.expert), run)
    return cfg, model, run, gen


@torch.inference_mode()
def test_padded_activation_rows_leave_the_denoising_loop_unchanged():
    """Row padding gives a GEMM zero rows after its activations and drops their outputs: the expert's FP8
    loop with every GEMM padded gives the unpadded loop's actions, and the GEMMs really read padded rows;
    row counts the padding does not name are read as they are."""
    cfg, model, run, gen = fp8_expert_loop(seed=7)
    unpadded = run()
    rows = cfg.suffix_len
    fp8.set_row_padding(model.expert, dict.fromkeys(fp8.FP8_GEMMS, {rows: rows + 7}))
    for module in fp8.fp8_modules(model.expert).values():
        padded = module.quantize(torch.randn(1, rows, module.in_features, generator=gen).bfloat16())
        assert padded.shape[0] == rows + 7 and not padded[rows:].float().any()  # zero rows after the real
        other = module.quantize(torch.randn(1, rows + 1, module.in_features, generator=gen).bfloat16())
        assert other.shape[0] == rows + 1  # a row count not named: not padded
    torch.testing.assert_close(run(), unpadded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no GEMM named up"):
        fp8.set_row_padding(model.expert, {"up": {50: 64}})
    with pytest.raises(ValueError, match="fewer rows padded than computed"):
        fp8.set_row_padding(model.expert, {"o": {50: 40}})


def geglu_on_the_cpu(calls):
    """A stand-in for the fused Triton kernel (CUDA only) with its contract: gelu(gate) * up in float32,
    divided by the down GEMM's input scale, cast to FP8, zero rows up to `out_rows`; records each call's
    (rows computed, rows out)."""

    def geglu(x, weight, x_scale, w_scale, out_scale, out_rows=-1):
        gate, up = ((x.float() @ weight.float().t()) * (x_scale * w_scale)).chunk(2, dim=-1)
        out = (torch.nn.functional.gelu(gate, approximate="tanh") * up / out_scale).clamp(-448, 448)
        rows = x.shape[0] if out_rows < 0 else out_rows
        calls.append((x.shape[0], rows))
        return torch.nn.functional.pad(out, (0, 0, 0, rows - x.shape[0])).to(torch.float8_e4m3fn)

    return geglu


@torch.inference_mode()
def test_the_fused_geglu_path_gives_the_down_gemm_its_padded_rows(monkeypatch):
    """Through the fused path (its kernel replaced by a CPU stand-in), the down GEMM reads the rows its
    padding names for the real row count (also when gate/up pads more), and the loop's actions are the
    unpadded ones."""
    from vla_runtime.graphs import layers

    calls = []
    monkeypatch.setattr(layers, "fp8_geglu", geglu_on_the_cpu(calls))
    cfg, model, run, _ = fp8_expert_loop(seed=11)
    for layer in model.expert.layers:
        layer.mlp.fused_geglu = True
    unpadded = run()
    rows = cfg.suffix_len
    assert calls and set(calls) == {(rows, rows)}
    for padding, expected in (
        ({"down": {rows: rows + 5}}, (rows, rows + 5)),
        ({"gate_up": {rows: rows + 3}, "down": {rows: rows + 5}}, (rows + 3, rows + 5)),
        ({"gate_up": {rows: rows + 9}, "down": {rows: rows + 5}}, (rows + 9, rows + 9)),
    ):
        calls.clear()
        fp8.set_row_padding(model.expert, padding)
        torch.testing.assert_close(run(), unpadded, rtol=0, atol=0)
        assert set(calls) == {expected}, padding


def test_fp8_attach_pads_the_experts_rows_only():
    """The product's padding (EXPERT_ROW_PADDING) goes to the action expert's FP8 GEMMs it names, none to
    the prefix's."""
    import types

    from vla_runtime.runtime.calibration import attach_fp8

    model = build_model(get_preset("pi05_tiny"), seed=3).set_precision(torch.bfloat16)
    modules = attach_fp8(types.SimpleNamespace(model=model), fp8_expert=True)
    expert = {name: m for name, m in modules.items() if name.startswith("expert.")}
    assert expert and len(expert) < len(modules)
    for name, module in modules.items():
        wanted = fp8.EXPERT_ROW_PADDING.get(name.rsplit(".", 1)[1], {}) if name in expert else {}
        assert module.row_padding == wanted, name
    assert any(m.row_padding for m in expert.values())
