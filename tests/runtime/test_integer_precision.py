"""`precision: int8` and `precision: w4a8` on the tiny presets, fresh random inputs: the Gemma stacks' GEMMs
are the integer ones, the actions stay within the mode's accuracy gates of float32 (and are not float32's),
the executor equals the eager reference in the same mode, and a mode that misses its gate is refused at
start-up unless forced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from vla_runtime.graphs.int8 import Int8Linear
from vla_runtime.graphs.w4a8 import W4A8Linear
from vla_runtime.runtime import accuracy
from vla_runtime.runtime.accuracy import GATES, Gates, accuracy_table
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.integer_precision import SAMPLED_ROWS, InputSampler
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation

MODULE = {"int8": Int8Linear, "w4a8": W4A8Linear}
CLI = str(Path(sys.executable).parent / "vla-runtime")


@pytest.fixture(scope="module", params=["pi05_tiny", "pi0_tiny"])
def float32(request):
    return EagerPolicy(RuntimeConfig(preset=request.param))


@pytest.mark.parametrize("precision", ["int8", "w4a8"])
def test_integer_modes_stay_within_their_gates_of_float32(float32, precision, rng):
    preset = float32.config.preset
    policy = EagerPolicy(RuntimeConfig(preset=preset, precision=precision, integer_stages="both"))
    model, cfg = policy.parts.model, policy.config.model
    gemms = [
        getattr(module, slot)
        for stack in (model.prefix_lm, model.expert)
        for layer in stack.layers
        for module, slot in ((layer.self_attn, "qkv_quant"), (layer.mlp, "gate_up_quant"))
        if getattr(module, slot) is not None
    ]
    assert len(gemms) == 2 * (len(model.prefix_lm.layers) + len(model.expert.layers)) - 1
    assert all(isinstance(g, MODULE[precision]) for g in gemms)
    prefix_last = model.prefix_lm.layers[-1].mlp.gate_up_quant
    assert prefix_last is None  # the prefix's last layer computes keys and values only
    gates = GATES[precision]
    # The gates hold on average over fresh frames, and every frame within a hair of them: the tiny random
    # pi0 in w4a8 sits near its gate (cosine 0.9725 at worst over 60 frames of one seed, 0.9698 seen once
    # in a full run), where the start-up gate judges the product's own synthetic frames.
    cosines, rels = [], []
    with PipelinedExecutor(parts=policy.parts) as executor:
        for _ in range(3):
            obs = random_observation(rng, preset)
            noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
            got = policy.infer(obs, noise).actions
            want = float32.infer(obs, noise).actions
            a, b = torch.from_numpy(got).flatten().double(), torch.from_numpy(want).flatten().double()
            cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            rels.append(float((a - b).norm() / b.norm()))
            assert rels[-1] > 1e-5  # the integer path ran
            np.testing.assert_allclose(executor.infer(obs, noise).actions, got, rtol=1e-5, atol=1e-5)
    assert np.mean(cosines) >= gates.actions_cosine and np.mean(rels) <= gates.actions_rel_l2, (cosines, rels)
    assert min(cosines) >= gates.actions_cosine - 0.005, cosines
    assert max(rels) <= 1.1 * gates.actions_rel_l2, rels


def test_a_mode_that_misses_its_gate_is_refused_unless_forced(monkeypatch):
    monkeypatch.setitem(
        accuracy.GATES, "w4a8", Gates(kv_cosine=0.99999, actions_cosine=0.5, actions_rel_l2=1)
    )
    with pytest.raises(
        ValueError, match=r"precision: w4a8 misses its accuracy gate .*prefix\.layer\d\d\.[kv]: cosine"
    ):
        build_parts(RuntimeConfig(preset="pi05_tiny", precision="w4a8", integer_stages="both"))
    parts = build_parts(
        RuntimeConfig(preset="pi05_tiny", precision="w4a8", integer_stages="both", force_precision=True)
    )
    assert isinstance(parts.model.expert.layers[0].mlp.down_quant, W4A8Linear)


def test_the_accuracy_table_gates_the_integer_modes():
    table = accuracy_table(RuntimeConfig(preset="pi05_tiny", precision="int8"), frames=2)
    gated = {r["name"]: r["gate"] for r in table["rows"] if r["gate"]}
    assert gated["actions"] == f"cosine >= {GATES['int8'].actions_cosine}"
    assert any(name.startswith("prefix.") for name in gated) and table["passed"]


def test_the_accuracy_command_takes_w4a8():
    run = subprocess.run(
        [CLI, "accuracy", "--preset", "pi05_tiny", "--precision", "w4a8", "--frames", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode in (0, 1), run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["precision"] == "w4a8" and (run.returncode == 0) == result["passed"]


@pytest.mark.parametrize("stages", ["prefix", "expert"])
def test_one_stack_alone_is_quantised_when_asked(stages):
    model = build_parts(RuntimeConfig(preset="pi05_tiny", precision="int8", integer_stages=stages)).model
    prefix, expert = model.prefix_lm.layers[0].self_attn, model.expert.layers[0].self_attn
    assert prefix.quant_enabled == (stages == "prefix") and isinstance(
        prefix.qkv_quant or 0, (Int8Linear, int)
    )
    assert expert.quant_enabled == (stages == "expert")
    with pytest.raises(ValueError, match="integer_stages: must be one of both, prefix, expert"):
        RuntimeConfig(integer_stages="vision")


def test_by_default_int8_quantises_both_stacks_and_w4a8_the_expert_alone():
    assert RuntimeConfig(precision="int8").quantised_stages == "both"
    assert RuntimeConfig(precision="w4a8").quantised_stages == "expert"
    assert RuntimeConfig(precision="w4a8", integer_stages="both").quantised_stages == "both"
    assert RuntimeConfig(precision="float32").quantised_stages is None
    with pytest.raises(ValueError, match="integer_stages: chooses the stacks int8 / w4a8 quantise, not used"):
        RuntimeConfig(precision="float32", integer_stages="both")  # accepted without a word before
    model = build_parts(RuntimeConfig(preset="pi05_tiny", precision="w4a8")).model
    assert model.prefix_lm.layers[0].self_attn.qkv_quant is None
    assert isinstance(model.expert.layers[0].self_attn.qkv_quant, W4A8Linear)


def test_rtc_with_exact_steps_through_an_integer_expert_is_refused():
    """Rounding has no useful gradient: the vector-Jacobian product would be wrong without a word."""
    rtc = dict(precision="w4a8", handover="rtc")
    with pytest.raises(ValueError, match="handover: rtc with rtc_vjp_steps > 0 .* w4a8 GEMMs round"):
        RuntimeConfig(**rtc)
    RuntimeConfig(**rtc, rtc_vjp_steps=0)  # the identity Jacobian needs no gradient
    RuntimeConfig(**rtc, integer_stages="prefix")  # the expert in float


def test_the_float_weights_are_released_after_the_gate_and_the_actions_do_not_change(rng):
    kept = build_parts(RuntimeConfig(preset="pi05_tiny", precision="int8", keep_float_weights=True))
    released = build_parts(RuntimeConfig(preset="pi05_tiny", precision="int8"))

    def float_bytes(parts) -> int:
        stacks = (parts.model.prefix_lm, parts.model.expert)
        return sum(p.numel() * p.element_size() for stack in stacks for p in stack.parameters())

    def gemm_weights(parts):  # the float weights of every quantised GEMM
        for stack in (parts.model.prefix_lm, parts.model.expert):
            for layer in stack.layers:
                attn, mlp = layer.self_attn, layer.mlp
                yield from (lin.weight for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
                if mlp.down_quant is not None:  # not the prefix's last layer (keys and values only)
                    yield from (
                        lin.weight for lin in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                    )

    gemm_bytes = sum(w.numel() * w.element_size() for w in gemm_weights(kept))
    assert all(w.numel() == 0 for w in gemm_weights(released))
    assert float_bytes(kept) - float_bytes(released) == gemm_bytes > 0
    with pytest.raises(ValueError, match="float weights of this stack were released"):
        released.model.expert.set_quantized(False)
    cfg = kept.config.model
    obs = random_observation(rng, "pi05_tiny")
    noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
    np.testing.assert_array_equal(
        EagerPolicy(parts=released).infer(obs, noise).actions,
        EagerPolicy(parts=kept).infer(obs, noise).actions,
    )


def test_the_calibration_sampler_keeps_a_uniform_sample_of_every_row_it_saw():
    """Rows numbered in the order seen, in calls of several sizes: the sample holds SAMPLED_ROWS distinct
    rows, spread over the whole stream (its mean near the middle), and the GEMM's output is unchanged."""
    weight = torch.randn(8, 4)
    sampler = InputSampler(weight)
    seen = 0
    for size in (300, 900, 50, 5000, 7000, 1):
        rows = torch.arange(seen, seen + size, dtype=torch.float32)[:, None].expand(size, 4)
        torch.testing.assert_close(sampler(rows), rows @ weight.T)
        seen += size
    numbers = sampler.samples()[:, 0]
    assert sampler.seen == seen and len(numbers) == SAMPLED_ROWS == len(set(numbers.tolist()))
    # the mean of 1024 draws from 0..seen-1 has a standard deviation of seen / sqrt(12 * 1024) ~ 0.009 seen
    assert abs(float(numbers.mean()) / seen - 0.5) < 0.05
    assert float((numbers < seen / 2).float().mean()) > 0.4  # early rows are not over-kept


def test_the_w4a8_smoothing_is_fitted_on_a_recording_when_one_is_given(tmp_path, rng):
    """Recorded observations (as the node or eval-libero --record write them) replace the synthetic
    frames: the fitted transform changes with them; a missing file is named; int8 refuses the setting."""
    from vla_runtime.runtime.recording import ObservationRecorder

    path = tmp_path / "calibration.mcap"
    with ObservationRecorder(path) as recorder:
        for i in range(3):
            obs = random_observation(rng, "pi05_tiny")
            obs.timestamp = 10.0 + 0.05 * i
            recorder.write(obs)
    settings = dict(preset="pi05_tiny", precision="w4a8", force_precision=True, keep_float_weights=True)
    recorded = build_parts(RuntimeConfig(**settings, integer_calibration=str(path)))
    synthetic = build_parts(RuntimeConfig(**settings))
    stacks = (recorded.model.expert, synthetic.model.expert)
    first = [stack.layers[0].self_attn.qkv_quant.scale for stack in stacks]
    assert not torch.allclose(*first)
    with pytest.raises(ValueError, match="integer_calibration: observations: no file at"):
        build_parts(RuntimeConfig(**settings, integer_calibration=str(tmp_path / "none.mcap")))
    with pytest.raises(ValueError, match="integer_calibration: fits the w4a8 smoothing"):
        RuntimeConfig(preset="pi05_tiny", precision="int8", integer_calibration=str(path))
