"""Does splitting K pay for the action expert's few-row FP8 GEMMs? An experiment on a CUDA GPU.

1. Alone: each expert GEMM (pi05: q/k/v, output, gate/up, down) at 10, 50 and 80 rows, cuBLAS
   (`torch._scaled_mm`; for the output projection also with the cast of its bf16 input, compiled, as the
   loop runs it) against graphs/fp8_skinny.py's split-K kernel over a sweep of tiles and splits. Each
   variant is captured 60 times back to back in a CUDA graph, call i reading weight copy i mod 24, so the
   weights come from DRAM as they do in the loop (24 copies of the largest are 200 MB, past the 60 MB L2);
   median of 20 replays. The split-K time counts its kernel only: the sum of its slices is fused into the
   next kernel in the loop (measured in part 2).
2. In place: the denoise stage (pi05, every FP8 option, 10 steps) captured as the executor captures it,
   with the best tile per shape from part 1, against the same stage on cuBLAS, in this process
   (stage_experiments.run_variant): median of 100 replays and the kernel count.

    python3 benchmarks/skinny_gemm_experiment.py --out $OUT/skinny.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header, save  # noqa: E402
from vla_runtime.graphs import fp8_skinny
from vla_runtime.graphs.config import get_preset

sys.path.insert(0, str(Path(__file__).parent))
from stage_experiments import VARIANTS, run_variant, time_graph  # noqa: E402

E4M3_MAX = 448.0
COPIES = 24
CALLS_IN_GRAPH = 60
SWEEP = {
    "block_n": (16, 32, 64),
    "block_k": (128, 256),
    "split": (1, 2, 4, 8, 16),
    "warps": (4,),
    "stages": (3,),
}


def expert_gemms() -> dict[str, tuple[int, int, bool]]:
    """name -> (N, K, input cast in the kernel), from pi05's action expert."""
    ex = get_preset("pi05").expert
    return {
        "qkv": ((ex.num_heads + 2 * ex.num_kv_heads) * ex.head_dim, ex.width, False),
        "o": (ex.width, ex.num_heads * ex.head_dim, True),
        "gate_up": (2 * ex.mlp_dim, ex.width, False),
        "down": (ex.width, ex.mlp_dim, False),
    }


def graph_us(ops) -> float:
    """`ops` (one per weight copy) called CALLS_IN_GRAPH times round-robin inside one CUDA graph."""
    for op in ops[:3]:
        op()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_IN_GRAPH):
            ops[i % len(ops)]()
    times = time_graph(graph.replay, torch.cuda.current_stream(), repeats=20, warmup=3)
    return float(np.median(times)) * 1e3 / CALLS_IN_GRAPH


def quantize(x, scale):
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def one_shape(name, rows, n, k, cast_in_kernel, configs) -> dict:
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    x_scale = (x.float().abs().amax() / E4M3_MAX).reshape(())
    x8 = quantize(x, x_scale)
    weights = [(torch.randn(n, k, device="cuda") / k**0.5).to(torch.float8_e4m3fn) for _ in range(COPIES)]
    w_scale = torch.full((), 1.0 / k**0.5, device="cuda")
    want = (x8.double() @ weights[0].double().t()) * float(x_scale) * float(w_scale)
    compiled_quantize = torch.compile(quantize, dynamic=False)
    row = {"gemm": name, "rows": rows, "n": n, "k": k, "cast_in_kernel": cast_in_kernel}
    row["cublas_us"] = graph_us(
        [
            lambda w=w: torch._scaled_mm(
                x8, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16
            )
            for w in weights
        ]
    )
    if cast_in_kernel:
        row["cast_and_cublas_us"] = graph_us(
            [
                lambda w=w: torch._scaled_mm(
                    compiled_quantize(x, x_scale),
                    w.t(),
                    scale_a=x_scale,
                    scale_b=w_scale,
                    out_dtype=torch.bfloat16,
                )
                for w in weights
            ]
        )
    row["weight_bytes"] = n * k
    row["sweep"] = []
    x_in = x if cast_in_kernel else x8
    for config in configs:
        block_n, block_k, split, _, _ = config
        if n % block_n or k % (split * block_k):
            continue
        fp8_skinny.CONFIGS[(n, k)] = config
        try:
            got = fp8_skinny.sum_of_slices(fp8_skinny.fp8_split_k(x_in, weights[0], x_scale, w_scale))
            err = float((got.double() - want).norm() / want.norm())
            us = graph_us([lambda w=w: fp8_skinny.fp8_split_k(x_in, w, x_scale, w_scale) for w in weights])
        except Exception as failure:  # noqa: BLE001 - a tile too large for shared memory
            row["sweep"].append({"config": config, "error": str(failure)[:200]})
            continue
        row["sweep"].append({"config": config, "us": us, "rel_l2": err})
    timed = [s for s in row["sweep"] if "us" in s and s["rel_l2"] < 2e-3]
    best = min(timed, key=lambda s: s["us"])
    row["best"] = best
    baseline = row.get("cast_and_cublas_us", row["cublas_us"])
    print(
        f"{name:8s} m{rows:<4d} cuBLAS {row['cublas_us']:6.2f} us"
        + (f" (+cast {baseline:6.2f})" if cast_in_kernel else "")
        + f"  split-K best {best['us']:6.2f} us {best['config']}  rel L2 {best['rel_l2']:.1e}",
        flush=True,
    )
    del weights
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("skinny.json"))
    ap.add_argument("--rows", default="10,80", help="row counts besides 50")
    ap.add_argument("--no-in-place", action="store_true")
    args = ap.parse_args()
    doc = {**run_header(), "cuda": torch.version.cuda, "sweep": SWEEP, "shapes": [], "in_place": []}
    # The whole sweep at the expert's 50 rows (each tile a Triton compile); other row counts get the
    # tile that won at 50, and its neighbours in the split.
    best = {}
    for name, (n, k, cast) in expert_gemms().items():
        row = one_shape(name, 50, n, k, cast, list(itertools.product(*SWEEP.values())))
        doc["shapes"].append(row)
        best[name] = tuple(row["best"]["config"])
        save(doc, args.out)
    for rows in [int(r) for r in args.rows.split(",") if int(r) != 50]:
        for name, (n, k, cast) in expert_gemms().items():
            block_n, block_k, split, warps, stages = best[name]
            near = [
                (block_n, block_k, s, warps, stages) for s in sorted({max(1, split // 2), split, split * 2})
            ]
            doc["shapes"].append(one_shape(name, rows, n, k, cast, near))
            save(doc, args.out)
    # The tile each shape runs in the loop: the best at the expert's 50 rows.
    fp8_skinny.CONFIGS.clear()
    for name, (n, k, _) in expert_gemms().items():
        fp8_skinny.CONFIGS[(n, k)] = best[name]
    doc["chosen_configs"] = {f"{n}x{k}": c for (n, k), c in fp8_skinny.CONFIGS.items()}
    save(doc, args.out)
    if args.no_in_place:
        return
    from vla_runtime.runtime.config import RuntimeConfig
    from vla_runtime.runtime.loading import build_parts

    parts = build_parts(RuntimeConfig(preset="pi05", device="cuda", precision="fp8", fp8_expert=True))
    stage, mode, settings = VARIANTS["denoise-fp8-expert"]
    for label, split_k in (
        ("cublas", False),
        ("split-k", True),
        ("cublas again", False),
        ("split-k again", True),
    ):
        row, runner = run_variant(
            parts, f"denoise-fp8-expert {label}", stage, mode, {**settings, "split_k": split_k}, 10
        )
        doc["in_place"].append(row)
        print(
            f"in place, {label:14s} {row['median_ms']:.3f} ms, {row['ops_per_call']:.0f} kernels, "
            f"kernel time {row['total_ms']:.3f} ms",
            flush=True,
        )
        save(doc, args.out)
        del runner
        torch.cuda.empty_cache()
    print(json.dumps({r["name"]: r["median_ms"] for r in doc["in_place"]}))


if __name__ == "__main__":
    main()
