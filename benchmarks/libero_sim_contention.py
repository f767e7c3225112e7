"""LIBERO simulators alone, N at once, no policy: how much a step slows when N simulators share the
machine. Parallel evaluation (docs/many_robots.md) measured a step's p50 at 26.6 ms with one worker and
36.2 ms with 16 beside the policy; this separates what the simulators do to each other from what the
policy's process adds.

Each simulator is a process of its own (single-threaded BLAS / OpenMP, as the sim server runs it) that
builds libero_spatial task (k mod 10), resets, waits for the others, then takes --steps steps of small
random actions, rendering every --render-every-th step (the observed steps of a replan of 5). Counts run
one after another; each reports the median step, the median rendered step and the median still one.

Run with the LIBERO Python (VLA_LIBERO_PYTHON on the GPU machine):
    python libero_sim_contention.py OUT.json --counts 1,16,8 [--steps 100] [--render-every 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

for pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # as sim/server.py runs it
    os.environ.setdefault(pool, "1")


def simulate(k: int, steps: int, render_every: int, start, results) -> None:
    from vla_runtime.sim.libero_env import LiberoSim

    sim = LiberoSim()
    sim.reset("libero_spatial", k % 10, settle_steps=10)
    rng = np.random.default_rng(k)
    start.wait()  # every simulator built and reset: the steps run together
    rendered, still = [], []
    for i in range(steps):
        action = np.concatenate([rng.uniform(-0.2, 0.2, 6), [-1.0]])
        render = i % render_every == 0
        began = time.perf_counter()
        sim.step(action, render=render)
        (rendered if render else still).append((time.perf_counter() - began) * 1e3)
    sim.close()
    results.put({"rendered_ms": rendered, "still_ms": still})


def run_count(count: int, steps: int, render_every: int) -> dict:
    context = mp.get_context("spawn")
    # a simulator that fails breaks the barrier (the others raise) and the queue's timeout ends the wait
    start, results = context.Barrier(count, timeout=300), context.Queue()
    workers = [
        context.Process(target=simulate, args=(k, steps, render_every, start, results)) for k in range(count)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=600) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    rendered = [t for r in reports for t in r["rendered_ms"]]
    still = [t for r in reports for t in r["still_ms"]]
    return {
        "simulators": count,
        "step_ms_p50": float(np.median(rendered + still)),
        "rendered_step_ms_p50": float(np.median(rendered)),
        "still_step_ms_p50": float(np.median(still)),
        "step_ms_p90": float(np.percentile(rendered + still, 90)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--counts", default="1,16,8")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--render-every", type=int, default=5)
    ap.add_argument("--what", default="", help="the machine and stack, recorded as given")
    args = ap.parse_args()
    runs = []
    for count in (int(c) for c in args.counts.split(",")):
        runs.append(run_count(count, args.steps, args.render_every))
        print(runs[-1], flush=True)
    out = {  # not results_doc.run_header: the LIBERO Python has no torch
        "date": time.strftime("%Y-%m-%d"),
        "commit": os.environ.get("VLA_COMMIT", "unknown"),
        "cpus": os.cpu_count(),
        "what": args.what,
        "steps": args.steps,
        "render_every": args.render_every,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
