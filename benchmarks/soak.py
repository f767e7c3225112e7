"""Soak: many frames through the pipelined executor on the CPU, with its memory and thread count sampled
along the way. A leak (a buffer, a future, a trace event or a thread per frame) shows as a slope.

    python3 benchmarks/soak.py --frames 100000 --out benchmarks/results/DATE-HOST-soak-COMMIT.json

Not a CI test (it runs for minutes). Frames are submitted in bursts of four and every burst waits for
the device, so most frames are dropped (newest wins) and every path (submit, drop, issue, complete)
runs tens of thousands of times. Each future is checked: resolved, as a chunk or FrameDropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results_doc import recorded_commit  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--preset", default="pi05_tiny")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--image-side", type=int, default=64)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--out", default="soak.json")
    args = p.parse_args(argv)

    import torch
    from vla_runtime.runtime.config import RuntimeConfig
    from vla_runtime.runtime.executor import PipelinedExecutor
    from vla_runtime.runtime.policy import FrameDropped
    from vla_runtime.runtime.synthetic import synthetic_observation

    version = recorded_commit()  # at the start: the code that runs
    config = RuntimeConfig(preset=args.preset, steps=args.steps)
    rng = np.random.default_rng(0)
    observations = [synthetic_observation(config, rng, args.image_side) for _ in range(16)]
    every = max(1, args.frames // args.samples)
    samples, outcomes, lock = [], {"chunks": 0, "dropped": 0, "other": 0}, threading.Lock()

    def resolved(future) -> None:  # runs on the completion thread, or on the submitter's for a drop
        err = future.exception()
        key = "chunks" if err is None else "dropped" if isinstance(err, FrameDropped) else "other"
        with lock:
            outcomes[key] += 1

    start = time.monotonic()
    with PipelinedExecutor(config) as policy:
        for k in range(args.frames):
            policy.submit(observations[k % len(observations)]).add_done_callback(resolved)
            if k % 4 == 3:
                policy.wait_idle()
            if k % every == 0:
                samples.append(
                    {
                        "frame": k,
                        "seconds": round(time.monotonic() - start, 2),
                        "rss_mib": round(rss_mib(), 1),
                        "threads": threading.active_count(),
                    }
                )
        policy.wait_idle()
        counters = policy.report()["counters"]
    warm = samples[len(samples) // 10]  # after the first tenth: allocator and caches settled
    last = samples[-1]
    result = {
        "benchmark": "soak",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": version,
        "config": vars(args),
        "counters": counters,
        "futures": outcomes,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_after_warmup_mib": round(last["rss_mib"] - warm["rss_mib"], 1),
        "threads_first_last": [samples[0]["threads"], last["threads"]],
        "samples": samples,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    ok = (
        sum(outcomes.values()) == args.frames
        and outcomes["other"] == 0
        and last["threads"] == samples[0]["threads"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
