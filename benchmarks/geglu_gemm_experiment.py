"""Would the GeGLU in an FP8 GEMM's epilogue pay? An experiment on a CUDA GPU, not runtime code.

Today each Gemma MLP runs the fused gate/up projection as one cuBLAS FP8 GEMM (`torch._scaled_mm`, bf16
out, [M, 2N]) followed by one Inductor kernel that reads it back, applies gelu(gate) * up and casts the
result to FP8 for the down projection. In the prefix (M = 968) that kernel reads 63 MB and writes 16 MB
per layer, 31 us. This script writes the alternative, one Triton kernel that computes the gate and up
tiles of the same rows together, applies the GeGLU to its float32 accumulators and stores FP8 directly,
and times both ways at the prefix's and the action expert's shapes (each captured 50 times in a CUDA
graph, median of 20 replays), after checking that they agree.

    python3 benchmarks/geglu_gemm_experiment.py --out $OUT/geglu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from stage_experiments import op_time_us  # noqa: E402

E4M3_MAX = 448.0


def configs():
    shapes = [(128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4)]
    shapes += [(64, 64, 128, 4, 4), (64, 32, 256, 4, 3), (64, 64, 256, 4, 3), (64, 32, 128, 4, 5)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


@triton.autotune(configs=configs(), key=["M", "N", "K"])
@triton.jit
def fp8_geglu_gemm_kernel(
    x_ptr,  # [M, K] float8 e4m3, row-major
    w_ptr,  # [2N, K] float8 e4m3, row-major: rows [0, N) gate, [N, 2N) up
    out_ptr,  # [M, N] float8 e4m3
    ab_scale_ptr,  # scalar: input scale * weight scale
    out_scale_ptr,  # scalar: the down projection's input scale
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs walk the output in groups of GROUP_M row blocks so that neighbours share weight tiles in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]
    gate_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N], K-major as FP8 MMA needs
    up_ptrs = gate_ptrs + N * K
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (checked by the caller)
        a = tl.load(x_ptrs, mask=rows[:, None] < M, other=0.0)
        gate = tl.dot(a, tl.load(gate_ptrs), gate)
        up = tl.dot(a, tl.load(up_ptrs), up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    scale = tl.load(ab_scale_ptr)
    gate = gate * scale
    up = up * scale
    # gelu, tanh approximation: 0.5 * (1 + tanh(y)) == sigmoid(2y)
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    out = gate * tl.sigmoid(2.0 * inner) * up / tl.load(out_scale_ptr)
    out = tl.minimum(tl.maximum(out, -448.0), 448.0)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(tl.float8e4nv), mask=rows[:, None] < M)


def fused_geglu(x8, w8, ab_scale, out_scale):
    m, k = x8.shape
    n = w8.shape[0] // 2
    if k % 256:
        raise ValueError(f"k: the kernel steps through K in blocks of up to 256, got {k}")
    out = torch.empty(m, n, device=x8.device, dtype=torch.float8_e4m3fn)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    fp8_geglu_gemm_kernel[grid](x8, w8, out, ab_scale, out_scale, m, n, k)
    return out


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
    ab_scale = (x_scale * w_scale).reshape(())
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
        return fused_geglu(x8, w8, ab_scale, out_scale)

    results = {}
    for name, fn in (("cublas+inductor", cublas_then_inductor), ("triton fused", triton_fused)):
        y = fn().float() * out_scale
        cosine = F.cosine_similarity(y.flatten(), exact.flatten(), dim=0).item()
        rel_l2 = ((y - exact).norm() / exact.norm()).item()
        results[name] = {"us": op_time_us(fn, repeats_in_graph), "cosine": cosine, "rel_l2": rel_l2}
    gemm_only = lambda: torch._scaled_mm(x8, w8.t(), scale_a=ab_scale, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    results["cublas gemm alone"] = {"us": op_time_us(gemm_only, repeats_in_graph)}
    best = fp8_geglu_gemm_kernel.best_config
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
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("VLA_COMMIT", "unknown"),
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
