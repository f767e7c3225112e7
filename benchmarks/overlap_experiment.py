"""Experiment: do vision/prefix GEMMs that leave SMs free (cuBLAS SM-count target) let the denoise loop
of the previous frame keep its speed, and raise pipelined throughput? One executor per carveout.

    python3 benchmarks/overlap_experiment.py --out DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import FrameDropped, PipelinedExecutor
from vla_runtime.runtime.synthetic import synthetic_observation

STAGES = ("vision", "prefix", "denoise")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--carveouts", default="none,16,32,48")
    args = ap.parse_args()
    config = RuntimeConfig(preset="pi05", device="cuda", precision="bf16")
    rng = np.random.default_rng(0)
    frames = [synthetic_observation(config, rng) for _ in range(8)]
    rows = []
    for c in args.carveouts.split(","):
        carve = None if c == "none" else int(c)
        ex = PipelinedExecutor(config.replace(overlap_sm_carveout=carve))
        seq = [ex.infer(frames[i % 8]) for i in range(45)][5:]
        futures, end, i = [], time.perf_counter() + 3.0, 0
        start = time.perf_counter()
        while time.perf_counter() < end:
            futures.append(ex.submit(frames[i % 8]))
            i += 1
            time.sleep(0.0005)
        ex.wait_idle(60)
        elapsed = time.perf_counter() - start
        done = [f.result() for f in futures if not isinstance(f.exception(), FrameDropped)]
        row = {
            "carveout": carve,
            "sequential_p50_ms": float(np.median([c.timings_ms["total"] for c in seq])),
            "sequential_stages_ms": {s: float(np.median([c.timings_ms[s] for c in seq])) for s in STAGES},
            "throughput_hz": len(done) / elapsed,
            "loaded_stages_ms": {s: float(np.median([c.timings_ms[s] for c in done])) for s in STAGES},
        }
        rows.append(row)
        print(json.dumps(row))
        ex.close()
        del ex
        gc.collect()
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "overlap_experiment.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
