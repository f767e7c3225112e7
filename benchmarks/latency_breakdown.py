"""Where a chunk's end-to-end time goes beyond the three stages: queue wait, the host-to-device copy,
the device span from the first copy to the last, and the host time around it (issue, completion).

    python3 benchmarks/latency_breakdown.py [--precision fp8 --fp8-expert]
        [--image-side 480 --resize-on-device] --out $OUT/breakdown.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from results_doc import run_header
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.synthetic import synthetic_observation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--fp8-expert", action="store_true")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--image-side", type=int, default=224, help="camera frames of this side (224: no resize)")
    ap.add_argument("--resize-on-device", action="store_true")
    ap.add_argument("--out", default="breakdown.json")
    args = ap.parse_args()
    config = RuntimeConfig(
        preset="pi05",
        device="cuda",
        precision=args.precision,
        fp8_expert=args.fp8_expert,
        resize_on_device=args.resize_on_device,
    )
    rng = np.random.default_rng(0)
    observations = [synthetic_observation(config, rng, args.image_side) for _ in range(8)]
    rows = []
    with PipelinedExecutor(config) as executor:
        for i in range(args.frames + 10):
            obs = observations[i % len(observations)]
            start = time.perf_counter()
            chunk = executor.infer(obs)
            wall = (time.perf_counter() - start) * 1e3
            if i >= 10:
                rows.append({**chunk.timings_ms, "caller_wall": wall})
    keys = sorted(rows[0])
    medians = {k: float(np.median([r[k] for r in rows])) for k in keys}
    medians["stages_sum"] = medians["vision"] + medians["prefix"] + medians["denoise"]
    medians["host_outside_device"] = medians["total"] - medians["device_total"]  # prepare included
    result = {
        **run_header(),
        "config": vars(args),
        "median_ms": medians,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k, v in medians.items():
        print(f"{k:40s} {v:8.3f} ms")


if __name__ == "__main__":
    main()
