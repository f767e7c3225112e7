"""Robots at 20 Hz on one GPU (issue 15, item 5): the batched server against independent executors (one
per robot, each its own weights), in one run.

Each robot is a thread that submits an observation every 50 ms (their phases spread over the period) and
waits for nothing; a chunk is on time when it comes within the deadline (50 ms) of its submit. Per
point: the worst robot's p99 latency, misses (late chunks plus observations replaced before they were
computed), chunks per second, and GPU memory per robot. Then the largest robot count that held p99 <=
50 ms with no miss is run again for --confirm-s seconds.

python benchmarks/fleet_bench.py OUT.json [--preset pi05] [--robots 1,2,4,6,8,10,12] [--seconds 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: its tests package
from vla_runtime.runtime.buffers import batch_profile  # noqa: E402
from vla_runtime.runtime.config import RuntimeConfig  # noqa: E402
from vla_runtime.runtime.executor import PipelinedExecutor  # noqa: E402
from vla_runtime.runtime.policy import FrameDropped  # noqa: E402
from vla_runtime.runtime.server import PolicyServer  # noqa: E402

from tests.conftest import random_observation  # noqa: E402

PERIOD_S = DEADLINE_S = 0.05


def drive(submit_for, robots: int, seconds: float, observations) -> dict:
    """`submit_for(i)(obs) -> Future` per robot; every robot at 20 Hz for `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(robots)]
    misses = [0] * robots
    lock = threading.Lock()

    def robot(i: int) -> None:
        submit = submit_for(i)
        start = time.monotonic() + i * PERIOD_S / robots  # phases spread over the period
        k = 0
        while True:
            tick = start + k * PERIOD_S
            if tick > start + seconds:
                return
            time.sleep(max(0.0, tick - time.monotonic()))
            sent = time.monotonic()

            def done(future, sent=sent):
                try:
                    future.result()
                except FrameDropped:
                    with lock:
                        misses[i] += 1
                    return
                latency = time.monotonic() - sent
                with lock:
                    latencies[i].append(latency * 1e3)
                    misses[i] += latency > DEADLINE_S

            submit(observations[(i + k) % len(observations)]).add_done_callback(done)
            k += 1

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # the last chunks
    with lock:
        p99 = [float(np.percentile(v, 99)) if v else float("inf") for v in latencies]
        chunks = sum(len(v) for v in latencies)
        return {
            "robots": robots,
            "worst_p99_ms": max(p99),
            "p50_ms": float(np.median([x for v in latencies for x in v])) if chunks else float("inf"),
            "misses": sum(misses),
            "chunks_per_s": chunks / seconds,
            "fewest_chunks_per_robot": min(len(v) for v in latencies),
        }


def memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def batched(config, robots: int, seconds: float, observations) -> dict:
    executor = PipelinedExecutor(config.replace(max_batch=min(8, batch_profile(min(robots, 8)))))
    try:
        with PolicyServer(executor, deadline_s=DEADLINE_S) as server:
            drive(lambda i: lambda obs: server.submit(f"r{i}", obs), robots, 2.0, observations)  # warm-up
            row = drive(lambda i: lambda obs: server.submit(f"r{i}", obs), robots, seconds, observations)
            row["batches_of"] = sorted({len(b) for b in server.batches})
    finally:
        executor.close()
    return row


def independent(config, robots: int, seconds: float, observations) -> dict:
    executors = [PipelinedExecutor(config) for _ in range(robots)]
    try:
        drive(lambda i: executors[i].submit, robots, 2.0, observations)
        return drive(lambda i: executors[i].submit, robots, seconds, observations)
    finally:
        for e in executors:
            e.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--robots", default="1,2,4,6,8,10,12")
    parser.add_argument("--independent-up-to", type=int, default=6, help="the baseline collapses past 4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--confirm-s", type=float, default=60.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    settings = dict(precision="fp8", vision_precision="fp16", fp8_expert=True) if cuda else {}
    config = RuntimeConfig(preset=args.preset, device="cuda" if cuda else "cpu", **settings)
    rng = np.random.default_rng(0)
    observations = [random_observation(rng, args.preset, side=224) for _ in range(8)]
    doc = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("VLA_COMMIT", "unknown"),
        "torch": torch.__version__,
        "workload": f"{args.preset}, 3 views 224x224, {settings or 'float32'}, 20 Hz per robot",
        "rows": [],
    }
    best = 0
    for robots in [int(r) for r in args.robots.split(",")]:
        for mode, run in (("batched", batched), ("independent", independent)):
            if mode == "independent" and robots > args.independent_up_to:
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row = {"mode": mode, **run(config, robots, args.seconds, observations)}
            row["memory_gib_per_robot"] = memory_gib() / robots
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
            args.out.write_text(json.dumps(doc, indent=1))
            if mode == "batched" and row["worst_p99_ms"] <= DEADLINE_S * 1e3 and row["misses"] == 0:
                best = max(best, robots)
    if best:
        doc["confirm"] = {
            "robots": best,
            "seconds": args.confirm_s,
            **batched(config, best, args.confirm_s, observations),
        }
        print("confirm", json.dumps(doc["confirm"]), flush=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
