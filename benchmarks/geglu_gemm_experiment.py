"""Does the GeGLU in an FP8 GEMM's epilogue pay? An experiment on a CUDA GPU.

The two-kernel way: the fused gate/up projection as one cuBLAS FP8 GEMM (`torch._scaled_mm`, bf16 out,
[M, 2N]), then one Inductor kernel that reads it back, applies gelu(gate) * up and casts the result to FP8
for the down projection (in the prefix, M = 968, that kernel reads 63 MB and writes 16 MB per layer).
The fused way: graphs/fp8_geglu.py, one Triton kernel computing the gate and up tiles of the same rows
together, the GeGLU on its float32 accumulators, FP8 stored directly. Both are checked against float32
and timed at the prefix's and the action expert's shapes (each captured 50 times in a CUDA graph,
median of 20 replays).

    python3 benchmarks/geglu_gemm_experiment.py --out $OUT/geglu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
import triton
from results_doc import run_header  # noqa: E402
from vla_runtime.graphs import fp8_geglu

sys.path.insert(0, str(Path(__file__).parent))
from stage_experiments import op_time_us  # noqa: E402

E4M3_MAX = 448.0


def geglu_cast(gate_up: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """As graphs/layers.py's GemmaMLP and graphs/fp8.py's FP8Linear do it (compiled below by Inductor)."""
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.gelu(gate, approximate="tanh") * up
    return (y.float() / out_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def measure(label, m, n, k, repeats_in_graph=50) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(2 * n, k, device="cuda") / k**0.5
    x_scale, w_scale = x.abs().amax() / E4M3_MAX, w.abs().amax() / E4M3_MAX
    x8, w8 = (x / x_scale).to(torch.float8_e4m3fn), (w / w_scale).to(torch.float8_e4m3fn)
    x_scale, w_scale = x_scale.reshape(()), w_scale.reshape(())
    ab_scale = x_scale * w_scale
    # float32 truth from the same quantised operands, and its FP8 output scale
    exact = x8.float() @ w8.float().t() * ab_scale
    gate, up = exact.chunk(2, dim=-1)
    exact = F.gelu(gate, approximate="tanh") * up
    out_scale = (exact.abs().amax() / E4M3_MAX).reshape(())

    compiled_cast = torch.compile(geglu_cast, dynamic=False)
    one = torch.ones((), device="cuda")

    def cublas_then_inductor():
        gate_up = torch._scaled_mm(x8, w8.t(), scale_a=ab_scale, scale_b=one, out_dtype=torch.bfloat16)
        return compiled_cast(gate_up, out_scale)

    def triton_fused():
        return fp8_geglu.fp8_geglu(x8, w8, x_scale, w_scale, out_scale)

    results = {}
    for name, fn in (("cublas+inductor", cublas_then_inductor), ("triton fused", triton_fused)):
        y = fn().float() * out_scale
        cosine = F.cosine_similarity(y.flatten(), exact.flatten(), dim=0).item()
        rel_l2 = ((y - exact).norm() / exact.norm()).item()
        results[name] = {"us": op_time_us(fn, repeats_in_graph), "cosine": cosine, "rel_l2": rel_l2}
    gemm_only = lambda: torch._scaled_mm(x8, w8.t(), scale_a=ab_scale, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    results["cublas gemm alone"] = {"us": op_time_us(gemm_only, repeats_in_graph)}
    best = fp8_geglu._fp8_geglu_kernel.best_config
    row = {"label": label, "m": m, "n": n, "k": k, "triton_config": str(best), "results": results}
    flops = 2 * m * 2 * n * k
    for r in results.values():
        r["tflops"] = flops / (r["us"] * 1e-6) / 1e12
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="geglu.json")
    args = ap.parse_args()
    result = {
        **run_header(),
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "shapes": [],
    }
    # pi05: the prefix (968 rows, width 2048, MLP 16384) and the action expert (50 rows, 1024, 4096)
    for label, m, n, k in (("prefix", 968, 16384, 2048), ("expert", 50, 4096, 1024)):
        row = measure(label, m, n, k)
        result["shapes"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(label, row["triton_config"], flush=True)
        for name, r in row["results"].items():
            extra = f"cos {r['cosine']:.6f} rel L2 {r['rel_l2']:.4f}" if "cosine" in r else ""
            print(f"  {name:20s} {r['us']:8.2f} us {r['tflops']:7.1f} TFLOP/s {extra}", flush=True)


if __name__ == "__main__":
    main()
