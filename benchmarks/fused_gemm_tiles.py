"""Tiles for the fused FP8 expert GEMMs (graphs/fp8_fused_gemm.py), chosen on the GPU by measurement.

Each of the expert's four GEMMs, with the prologue and epilogue the fused layer gives it, is timed for
every candidate tile in a CUDA graph of back-to-back calls, each call on a different copy of the weight
(more copies than L2 holds, so weights come from DRAM as they do in the denoising loop), median of 20
replays. cuBLAS's FP8 GEMM alone (`torch._scaled_mm`, what the unfused layer runs, without the small
kernels the fused one absorbs) is timed the same way, for reference.

    python3 benchmarks/fused_gemm_tiles.py --out $OUT/tiles.json [--rows 50,400]

`best_tiles(rows)` is what stage_experiments.py calls before it captures the fused variants.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header  # noqa: E402
from vla_runtime.graphs import fp8_fused_gemm
from vla_runtime.graphs.config import GEMMA_300M
from vla_runtime.graphs.fp8_fused_gemm import Tiles

CANDIDATES = [
    Tiles(block_m=m, block_n=n, block_k=k, warps=w, stages=s)
    for m, n, k, w, s in itertools.product((16, 64), (16, 32, 64), (128, 256), (4,), (4,))
]
WEIGHT_COPIES = 36  # 36 x 2-8 MB of FP8 weights: more than an H100's or H200's 50 MB L2


def expert_gemms(cfg=GEMMA_300M) -> dict[str, tuple[int, int, str, str]]:
    """name -> (N of the weight, K, prologue, epilogue), as the fused expert layer runs them."""
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return {
        "qkv": (qkv, cfg.width, "norm", "plain"),
        "o": (cfg.width, cfg.num_heads * cfg.head_dim, "cast", "residual"),
        "gate_up": (2 * cfg.mlp_dim, cfg.width, "norm", "geglu"),
        "down": (cfg.width, cfg.mlp_dim, "fp8", "residual"),
    }


def graph_us(calls, repeats=20) -> float:
    """Median time per call of `calls` (a list of closures) captured back to back in one CUDA graph."""
    for call in calls[:3]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times[3:])) * 1e3 / len(calls)


def measure(rows: int, items: int = 1) -> list[dict]:
    """Every candidate for every GEMM at `rows` rows (`items` batch items of rows / items)."""
    dev = "cuda"
    one = torch.ones((), device=dev)
    results = []
    for name, (n, k, prologue, epilogue) in expert_gemms().items():
        weights = [torch.randn(n, k, device=dev).to(torch.float8_e4m3fn) for _ in range(WEIGHT_COPIES)]
        x_dtype = torch.float8_e4m3fn if prologue == "fp8" else torch.bfloat16
        x = torch.randn(rows, k, device=dev).to(x_dtype)
        out_n = n // 2 if epilogue == "geglu" else n
        extra = {}
        if prologue == "norm":
            extra.update(norm_scale=torch.randn(items, k, device=dev).bfloat16(), eps=1e-6)
            extra["norm_shift"] = torch.randn(items, k, device=dev).bfloat16()
        if epilogue == "residual":
            extra.update(residual=torch.randn(rows, out_n, device=dev).bfloat16())
            extra["gate"] = torch.randn(items, out_n, device=dev).bfloat16()
        if epilogue == "geglu":
            extra["out_scale"] = one
        x8 = x if x_dtype == torch.float8_e4m3fn else x.to(torch.float8_e4m3fn)
        row = {"gemm": name, "rows": rows, "n": n, "k": k, "prologue": prologue, "epilogue": epilogue}
        cublas = functools.partial(torch._scaled_mm, x8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        row["cublas_us"] = graph_us([functools.partial(cublas, w.t()) for w in weights])
        fused = functools.partial(
            torch.ops.vla_runtime.fp8_fused_gemm,
            x,
            x_scale=one,
            w_scale=one,
            prologue=prologue,
            epilogue=epilogue,
            gemm=name,
            rows_per_item=rows // items,
            **extra,
        )
        row["tiles"] = []
        for tiles in CANDIDATES:
            fp8_fused_gemm.PINNED_TILES[name] = tiles
            try:
                us = graph_us([functools.partial(fused, weight=w) for w in weights])
            except Exception as exc:  # a tile too large for shared memory, say
                row["tiles"].append({**tiles.__dict__, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            row["tiles"].append({**tiles.__dict__, "us": us})
        fp8_fused_gemm.PINNED_TILES.pop(name, None)
        timed = [t for t in row["tiles"] if "us" in t]
        row["best"] = min(timed, key=lambda t: t["us"]) if timed else None
        results.append(row)
        best = row["best"] or {"us": float("nan")}
        print(
            f"{name:8s} m{rows:<4d} cuBLAS {row['cublas_us']:6.2f} us, fused best {best['us']:6.2f} us {best}"
        )
    return results


def best_tiles(rows: int = 50) -> tuple[dict[str, Tiles], list[dict]]:
    measured = measure(rows)
    best = {
        r["gemm"]: Tiles(**{k: v for k, v in r["best"].items() if k != "us"}) for r in measured if r["best"]
    }
    return best, measured


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tiles.json")
    ap.add_argument("--rows", default="50")
    args = ap.parse_args()
    result = {**run_header(), "weight_copies": WEIGHT_COPIES, "measured": []}
    for rows in (int(r) for r in args.rows.split(",")):
        result["measured"] += measure(rows, items=max(1, rows // 50))
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
