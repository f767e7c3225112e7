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
    depth = config.model.prefix_lm.depth
    names = {x["name"] for x in layered["layers"]}
    # every layer's attention_in range; attention_out_mlp for all but the last (it computes its K/V only)
    assert {f"prefix.layer{i:02d}.attention_in" for i in range(depth)} <= names, sorted(names)
    assert len(names) == 2 * depth - 1, sorted(names)
    assert captured["compiled"] and captured["layers"] == []
    # Kernel time fits inside the graph's wall time, and the graph is mostly kernels.
    ratio = captured["total_ms"] / captured["graph_ms"]
    assert 0.7 <= ratio <= 1.05, (captured["total_ms"], captured["graph_ms"])
    top3 = [k["name"] for k in captured["top"][:3]]
    assert any("qqtst" in n or "gemm" in n.lower() for n in top3), top3  # FP8 GEMMs lead
    assert captured["graph_ms"] < layered["total_ms"], (captured["graph_ms"], layered["total_ms"])
    assert (tmp_path / "captured-pi05-fp8-prefix.trace.json").stat().st_size > 1000
