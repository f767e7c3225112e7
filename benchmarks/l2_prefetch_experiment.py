"""Does prefetching the next layer's weights into L2 make the action expert's FP8 GEMMs faster? (GPU)

The four FP8 GEMMs of a pi05 expert layer at 50 rows, for `--sets` distinct layers' weights (more bytes
than L2 holds), captured in one CUDA graph per variant and timed with CUDA events (median of replays,
warm-up excluded), per layer:
- dram: each layer's GEMMs read their weights from DRAM, as in the denoising loop;
- l2: the first layer's weights again and again (resident in L2): the floor prefetching could reach;
- launch only: a prefetch kernel of one 16-byte chunk before each layer (its launch, no traffic);
- prefetch <chunk> [evict_last]: the next layer's weights prefetched (graphs/l2_prefetch.py) before each
  layer's GEMMs; prefetch alone: the same kernels without the GEMMs.

    python3 benchmarks/l2_prefetch_experiment.py --out $OUT/l2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header
from vla_runtime.graphs import l2_prefetch
from vla_runtime.graphs.config import PRESETS

ROWS = 50


def expert_shapes() -> dict[str, tuple[int, int]]:
    ex = PRESETS["pi05"].expert
    return {
        "qkv": ((ex.num_heads + 2 * ex.num_kv_heads) * ex.head_dim, ex.width),
        "o": (ex.width, ex.num_heads * ex.head_dim),
        "gate_up": (2 * ex.mlp_dim, ex.width),
        "down": (ex.width, ex.mlp_dim),
    }


def time_graph(graph: torch.cuda.CUDAGraph, repeats: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="l2_prefetch.json")
    ap.add_argument("--sets", type=int, default=24)
    ap.add_argument("--chunks", default="4096,16384,65536,262144")
    args = ap.parse_args()
    device = torch.device("cuda")
    ok, why = l2_prefetch.available(device)
    if not ok:
        raise SystemExit(why)
    shapes = expert_shapes()
    one = torch.ones((), device=device)
    inputs = {
        k: torch.randn(ROWS, k, device=device).to(torch.float8_e4m3fn)
        for k in {k for _, k in shapes.values()}
    }
    layers = [
        {name: torch.randn(n, k, device=device).to(torch.float8_e4m3fn) for name, (n, k) in shapes.items()}
        for _ in range(args.sets)
    ]
    layer_bytes = sum(w.numel() for w in layers[0].values())

    def gemms(weights):
        for w in weights.values():
            torch._scaled_mm(inputs[w.shape[1]], w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    tiny = l2_prefetch.PrefetchTable([torch.zeros(16, dtype=torch.uint8, device=device)], chunk=16)

    def variant(body) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()  # warm-up outside the graph (Triton compiles, cuBLAS picks its kernels)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            body()
        torch.cuda.synchronize()
        return 1e3 * time_graph(graph) / args.sets  # us per layer

    x = next(iter(inputs.values()))
    rows = {
        "dram": variant(lambda: [gemms(w) for w in layers]),
        "l2": variant(lambda: [gemms(layers[0]) for _ in layers]),
        "launch only": variant(lambda: [(tiny(x), gemms(w)) for w in layers]),
    }
    for chunk in (int(c) for c in args.chunks.split(",")):
        for evict_last in (False, True):
            tables = [l2_prefetch.PrefetchTable(list(w.values()), chunk, evict_last) for w in layers]
            label = f"prefetch {chunk}" + (" evict_last" if evict_last else "")
            try:
                rows[label] = variant(
                    lambda tables=tables: [
                        (tables[(i + 1) % len(layers)](x), gemms(w)) for i, w in enumerate(layers)
                    ]
                )
                rows[label + " alone"] = variant(lambda tables=tables: [t(x) for t in tables])
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                rows[label] = f"{type(exc).__name__}: {exc}"[:500]
            print(label, rows[label], rows.get(label + " alone"), flush=True)
    result = {
        **run_header(),
        "workload": f"pi05 expert's four FP8 GEMMs at {ROWS} rows, {args.sets} layers' weights "
        f"({layer_bytes / 1e6:.1f} MB a layer), one graph per variant, us per layer (median of 50 replays)",
        "us_per_layer": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k, v in rows.items():
        print(f"{k:32s} {v if isinstance(v, str) else f'{v:7.2f} us'}", flush=True)


if __name__ == "__main__":
    main()
