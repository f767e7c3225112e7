"""Attention alone, at the pi05 denoise and prefix shapes, every candidate in one process on one GPU.

Candidates: the eager attention (`grouped_attention`: two GEMMs around a float32 softmax, plus the
concatenation of the cache with the suffix keys in the denoise case), the Triton split-KV kernel over a
sweep of tile sizes, and PyTorch's SDPA with a boolean mask (it picks its backend). Each is captured 20
times in one CUDA graph and timed with CUDA events, median of 30 replays, warm-up excluded; errors are
against float32.

    python3 benchmarks/attention_experiments.py --out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from vla_runtime.graphs import split_kv_attention as skv
from vla_runtime.graphs.layers import attention_bias, grouped_attention

SHAPES = {  # queries per head, prefix keys, suffix keys
    "denoise": (50, 968, 50),
    "prefix": (968, 968, 0),
}
HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256


def time_in_graph(fn, calls=20, replays=30) -> float:
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return float(np.median(times[3:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention.json")
    args = ap.parse_args()
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "commit": os.environ.get("VLA_COMMIT", "unknown"),
        "shapes": {},
    }
    for shape, (t, s1, s2) in SHAPES.items():
        result["shapes"][shape] = measure_shape(shape, t, s1, s2)
        Path(args.out).write_text(json.dumps(result, indent=2))


def measure_shape(shape: str, t: int, s1: int, s2: int) -> list[dict]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, dtype=dt)
    k1, v1 = (torch.randn(1, KV_HEADS, s1, HEAD_DIM, device=dev, dtype=dt) for _ in range(2))
    k2, v2 = (torch.randn(1, KV_HEADS, s2, HEAD_DIM, device=dev, dtype=dt) for _ in range(2))
    valid = torch.ones(s1 + s2, dtype=torch.bool, device=dev)
    valid[s1 - 150 : s1] = False  # prompt padding
    pad = -(s1 + s2) % 8
    allowed = torch.cat(
        [valid.expand(1, t, s1 + s2), torch.zeros(1, t, pad, dtype=torch.bool, device=dev)], 2
    )
    bias = attention_bias(allowed, HEADS // KV_HEADS, dt)
    zeros = torch.zeros(1, KV_HEADS, pad, HEAD_DIM, device=dev, dtype=dt)
    keys, values = torch.cat([k1, k2, zeros], 2), torch.cat([v1, v2, zeros], 2)
    expected = grouped_attention(q.float(), keys.float(), values.float(), bias.float())
    rows = []

    def add(name, fn):
        try:
            out = fn()
            err = float((out.float() - expected).abs().max() / expected.abs().max())
            us = time_in_graph(fn)
            rows.append({"name": name, "us": us, "rel_err": err})
            print(f"{shape:8s} {name:50s} {us:8.2f} us  err {err:.2e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{shape:8s} {name:50s} ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    add(
        "eager (cat + 2 GEMMs + softmax)",
        lambda: grouped_attention(q, torch.cat([k1, k2, zeros], 2), torch.cat([v1, v2, zeros], 2), bias),
    )
    add("eager without the cat", lambda: grouped_attention(q, keys, values, bias))
    mask4 = allowed[:, None, :, : s1 + s2]  # [B, 1, T, S] boolean, broadcast over heads
    add(
        "sdpa, boolean mask, enable_gqa",
        lambda: F.scaled_dot_product_attention(q, keys[:, :, : s1 + s2], values[:, :, : s1 + s2],
                                               attn_mask=mask4, enable_gqa=True),
    )  # fmt: skip
    for bm, bn, warps, stages in itertools.product((32, 64, 128), (32, 64), (4, 8), (1, 2, 3)):
        if bm == 128 and warps == 4:
            continue
        add(
            f"split-kv BLOCK_M={bm} BLOCK_N={bn} warps={warps} stages={stages}",
            lambda bm=bm, bn=bn, w=warps, st=stages: skv.launch(q, k1, v1, k2, v2, bias, bm, bn, w, st),
        )
    return rows


if __name__ == "__main__":
    main()
