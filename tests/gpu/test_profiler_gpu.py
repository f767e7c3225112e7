"""The layer profiler on the GPU: the uncompiled per-layer view and the captured (compiled) view of the
FP8 prefix, whose kernel times must account for the graph's measured time."""

from __future__ import annotations

from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.profiler import format_report, profile_captured, profile_stages


def test_profiles_of_the_fp8_prefix(cuda, tmp_path):
    config = RuntimeConfig(preset="pi05", device="cuda", precision="fp8")
    layered = profile_stages(config, ("prefix",), out_dir=tmp_path)["prefix"]
    captured = profile_captured(config, ("prefix",), out_dir=tmp_path)["prefix"]
    print("\n" + format_report({"prefix (uncompiled)": layered, "prefix (captured)": captured}))
    assert len(layered["layers"]) == 2 * config.model.prefix_lm.depth  # attention_in / attention_out_mlp
    assert captured["compiled"] and captured["layers"] == []
    # Kernel time fits inside the graph's wall time, and the graph is mostly kernels.
    assert 0.7 * captured["graph_ms"] <= captured["total_ms"] <= 1.05 * captured["graph_ms"]
    assert any("qqtst" in k["name"] or "gemm" in k["name"].lower() for k in captured["top"][:3])
    assert captured["graph_ms"] < layered["total_ms"]  # compiled and captured beats the eager stage
    assert (tmp_path / "captured-pi05-fp8-prefix.trace.json").stat().st_size > 1000
