"""Precision plumbing on the CPU: the fp16/bf16 boundary, the accuracy table and its gates, FP8 refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vla_runtime.runtime.accuracy import accuracy_table, compare
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation


def test_fp16_vision_meets_bf16_prefix_without_dtype_errors(rng):
    policy = EagerPolicy(RuntimeConfig(preset="pi05_tiny", precision="bf16", vision_precision="fp16"))
    model = policy.parts.model
    assert model.vision.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    assert model.projector.weight.dtype == torch.bfloat16
    assert model.prefix_lm.layers[0].mlp.gate_up_weight.dtype == torch.bfloat16
    assert np.isfinite(policy.infer(random_observation(rng)).actions).all()


def test_compare_metrics():
    ref = torch.tensor([1.0, 2.0, 3.0])
    assert compare(ref, ref) == {"cosine": pytest.approx(1.0), "max_abs_err": 0.0, "rel_l2": 0.0}
    off = compare(ref, torch.tensor([1.0, 2.0, 4.0]))
    assert off["max_abs_err"] == 1.0 and off["rel_l2"] == pytest.approx(1 / 14**0.5) and off["cosine"] < 1


def test_accuracy_table_checks_vision_gates_per_layer():
    result = accuracy_table(
        RuntimeConfig(preset="pi05_tiny", precision="bf16", vision_precision="fp16"), frames=2
    )
    names = [r["name"] for r in result["rows"]]
    assert (
        names[:2] == ["vision.layer00", "vision.layer01"]
        and "prefix.layer01.v" in names
        and names[-1] == "actions"
    )
    gated = [r for r in result["rows"] if r["gate"]]
    assert {r["name"] for r in gated} == {"vision.layer00", "vision.layer01", "vision.image_tokens"}
    assert result["passed"] is True and all(r["ok"] for r in gated)  # fp16 vision is close to float32
    assert result["vision_precision"] == "float16"


def test_the_table_names_the_vision_towers_dtype_not_the_quantised_stacks():
    """int8 quantises the Gemma stacks only: the tower computes in float32 on the CPU, and says so."""
    result = accuracy_table(RuntimeConfig(preset="pi05_tiny", precision="int8"), frames=1)
    assert result["precision"] == "int8" and result["vision_precision"] == "float32"


def test_accuracy_gates_fail_for_a_different_model():
    """The same table with other weights as the candidate: the vision gates fail and say where."""
    from vla_runtime.runtime.loading import build_parts

    config = RuntimeConfig(preset="pi05_tiny", precision="bf16", vision_precision="fp16")
    other = build_parts(config.replace(seed=1))
    result = accuracy_table(config, frames=1, candidate=other)
    failed = {r["name"] for r in result["rows"] if not r["ok"]}
    assert result["passed"] is False and "vision.layer00" in failed


def test_fp8_is_refused_without_a_capable_gpu():
    with pytest.raises(ValueError, match="precision: fp8 needs a CUDA GPU"):
        RuntimeConfig(preset="pi05_tiny", precision="fp8")


def test_layer_profiler_reports_layers_and_ops(tmp_path):
    from vla_runtime.runtime.profiler import format_report, profile_stages

    report = profile_stages(
        RuntimeConfig(preset="pi05_tiny"), stages=("prefix",), top=5, repeats=2, out_dir=tmp_path
    )
    prefix = report["prefix"]
    assert [x["name"] for x in prefix["layers"]] == [
        "prefix.layer00.attention_in",
        "prefix.layer00.attention_out_mlp",
        "prefix.layer01.attention_in",
    ]
    assert (
        prefix["total_ms"] > 0
        and len(prefix["top"]) == 5
        and 0 < sum(k["share"] for k in prefix["top"]) <= 1.0
    )
    assert (tmp_path / "profile-pi05_tiny-float32-prefix.trace.json").stat().st_size > 1000
    assert "slowest layers" in format_report(report)
