"""The action expert's FP8 GEMMs at 50 rows, laid out other ways (GPU): which does cuBLAS run fastest?

Each variant runs one GEMM shape over `--sets` distinct weights (more bytes than L2 holds, as in the
denoising loop, where every layer's weights come from DRAM), captured in one CUDA graph and timed with CUDA
events (median of replays, warm-up excluded); us per GEMM. Variants:
- as served: y [M, N] = x [M, K] W^T (cuBLAS sees M = 50 rows);
- rows 64: the same with the activations padded to 64 rows;
- swapped: y^T [N, 64] = W x^T, so cuBLAS sees the weights' N as its rows and the 64 padded activation
  rows as its columns (the transpose back is a free view for the next elementwise kernel);
- each also with `use_fast_accum` (Hopper's FP8 accumulation without the periodic promotion).

    python3 benchmarks/expert_gemm_layouts.py --out $OUT/layouts.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header
from stage_experiments import time_graph
from vla_runtime.graphs.config import PRESETS

ROWS, PADDED = 50, 64


def expert_shapes() -> dict[str, tuple[int, int]]:
    ex = PRESETS["pi05"].expert
    return {
        "qkv": ((ex.num_heads + 2 * ex.num_kv_heads) * ex.head_dim, ex.width),
        "o": (ex.width, ex.num_heads * ex.head_dim),
        "gate_up": (2 * ex.mlp_dim, ex.width),
        "down": (ex.width, ex.mlp_dim),
    }


def graph_us(body, count: int, repeats: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    return 1e3 * float(np.median(time_graph(graph.replay, stream, repeats=repeats, warmup=5))) / count


def shape_row(n: int, k: int, sets: int) -> dict:
    """One GEMM shape's variants, us per GEMM."""
    device = torch.device("cuda")
    one = torch.ones((), device=device)
    weights = [torch.randn(n, k, device=device).to(torch.float8_e4m3fn) for _ in range(sets)]
    x = torch.randn(ROWS, k, device=device).to(torch.float8_e4m3fn)
    x64 = torch.randn(PADDED, k, device=device).to(torch.float8_e4m3fn)

    def served(inputs, fast):
        for w in weights:
            torch._scaled_mm(
                inputs, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast
            )

    def swapped(fast):
        for w in weights:
            torch._scaled_mm(
                w, x64.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast
            )

    reference = torch._scaled_mm(x64, weights[0].t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    check = torch._scaled_mm(weights[0], x64.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    row = {"n": n, "k": k, "swapped_max_abs_diff_fp32": float((check.t() - reference).abs().max())}
    for fast in (False, True):
        tag = " fast accum" if fast else ""
        for label, body in (
            (f"as served{tag}", lambda fast=fast: served(x, fast)),
            (f"rows 64{tag}", lambda fast=fast: served(x64, fast)),
            (f"swapped{tag}", lambda fast=fast: swapped(fast)),
        ):
            try:
                row[label] = graph_us(body, sets)
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                row[label] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def padding_row(n: int, k: int, sets: int, row_counts: list[int]) -> dict:
    """One GEMM shape at each row count as served and padded to a multiple of 64 rows, us per GEMM."""
    device = torch.device("cuda")
    one = torch.ones((), device=device)
    weights = [torch.randn(n, k, device=device).to(torch.float8_e4m3fn) for _ in range(sets)]

    def served(inputs):
        for w in weights:
            torch._scaled_mm(inputs, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    row = {"n": n, "k": k}
    for rows in row_counts:
        for label, count in ((f"{rows} rows", rows), (f"{rows} rows padded", rows + -rows % 64)):
            x = torch.randn(count, k, device=device).to(torch.float8_e4m3fn)
            row[label] = graph_us(lambda x=x: served(x), sets)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="layouts.json")
    ap.add_argument("--sets", type=int, default=24)
    ap.add_argument(
        "--padding-rows",
        type=lambda v: [int(r) for r in v.split(",")],
        default=[],
        help="instead: each shape at these row counts, as served and padded to a multiple of 64",
    )
    args = ap.parse_args()
    rows = {}
    for name, (n, k) in expert_shapes().items():
        if args.padding_rows:
            rows[name] = padding_row(n, k, args.sets, args.padding_rows)
        else:
            rows[name] = shape_row(n, k, args.sets)
        print(name, json.dumps(rows[name]), flush=True)
    workload = (
        f"rows {args.padding_rows} as served and padded to a multiple of 64"
        if args.padding_rows
        else f"{ROWS} activation rows ({PADDED} padded)"
    )
    result = {
        **run_header(),
        "workload": f"pi05 expert's FP8 GEMMs, {workload}, {args.sets} weights per shape in one graph (from "
        "DRAM), us per GEMM (median of 50 replays)",
        "gemms": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
