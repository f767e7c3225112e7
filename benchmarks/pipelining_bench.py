"""Latency first against throughput pipelining, side by side in one run (issue 16, item 5): one executor
per mode, fed observations at fixed rates; per mode and rate, the chunk latency from `submit` (p50,
p99), chunks per second and frames replaced before they reached the device.

python benchmarks/pipelining_bench.py OUT.json [--preset pi05 --mode fp8_all] [--rates 20,60] [--seconds 10]
(on a CPU: --preset pi05_tiny --mode float32)
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header, save
from vla_runtime.runtime.config import GPU_PRECISION_OPTIONS, RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.pipelining import PIPELINING_MODES
from vla_runtime.runtime.policy import FrameDropped
from vla_runtime.runtime.synthetic import synthetic_observation

WARMUP_FRAMES = 20


def drive(executor: PipelinedExecutor, observations: list, rate_hz: float, seconds: float) -> dict:
    totals, dropped, lock = [], [0], threading.Lock()

    def done(future):
        if isinstance(future.exception(), FrameDropped):  # asked, not raised (no traceback cycle)
            with lock:
                dropped[0] += 1
            return
        chunk = future.result()
        with lock:
            totals.append(chunk.timings_ms["total"])

    period, start = 1.0 / rate_hz, time.perf_counter()
    frames = int(seconds * rate_hz)
    for i in range(frames):
        time.sleep(max(0.0, start + i * period - time.perf_counter()))
        executor.submit(observations[i % len(observations)]).add_done_callback(done)
    executor.wait_idle(60)
    elapsed = time.perf_counter() - start
    return {
        "rate_hz": rate_hz,
        "frames": frames,
        "chunks": len(totals),
        "dropped": dropped[0],
        "chunks_per_s": len(totals) / elapsed,
        "total_p50_ms": float(np.percentile(totals, 50)),
        "total_p99_ms": float(np.percentile(totals, 99)),
        "pipelining": executor.report()["pipelining"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--mode", default="fp8_all", help=f"{', '.join(GPU_PRECISION_OPTIONS)} or float32")
    parser.add_argument("--rates", default="20,60")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    settings = GPU_PRECISION_OPTIONS.get(args.mode, {"precision": args.mode})
    doc = {
        **run_header(),
        "preset": args.preset,
        "precision": settings,
        "rows": [],
    }
    for pipelining in PIPELINING_MODES:
        config = RuntimeConfig(
            preset=args.preset, device="cuda" if cuda else "cpu", pipelining=pipelining, **settings
        )
        rng = np.random.default_rng(0)
        observations = [synthetic_observation(config, rng) for _ in range(8)]
        with PipelinedExecutor(config) as executor:
            for i in range(WARMUP_FRAMES):
                executor.infer(observations[i % len(observations)])
            for rate in [float(r) for r in args.rates.split(",")]:
                row = {"pipelining": pipelining, **drive(executor, observations, rate, args.seconds)}
                doc["rows"].append(row)
                print(json.dumps(row), flush=True)
                save(doc, args.out)


if __name__ == "__main__":
    main()
