"""How the executor's completion thread waits for a frame's last event: spinning (CUDA's default for an
event) or blocking (`torch.cuda.Event(blocking=True)`: the thread sleeps until the device signals it).

A spinning wait holds a CPU core for the whole device time of every frame (about 14 ms of each 50 ms at
20 Hz); beside 16 LIBERO simulators on 16 cores, or on a robot's few cores, that core is taken from
someone. A blocking wait frees it, at the cost of a wake-up. Measured here in one process, one executor,
turns of the two ways: latency from `submit` (the chunk's `total`) and the process's CPU time per frame
(every thread: submit, dispatcher, completion).

    python3 benchmarks/device_wait_bench.py --precision fp8 --fp8-expert --out $OUT/device-wait.json

The events are swapped between turns while nothing is in flight (the executor reads them by ring slot
when it issues and finishes a frame); this is an experiment on the executor's private events, the way
`device_wait` builds them (RuntimeConfig).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import EVENT_NAMES, PipelinedExecutor
from vla_runtime.runtime.synthetic import synthetic_observation

WAYS = ("spin", "block")


def events_for(executor: PipelinedExecutor, way: str) -> list[dict]:
    return [
        {n: torch.cuda.Event(enable_timing=True, blocking=way == "block") for n in EVENT_NAMES}
        for _ in executor._events
    ]


def one_turn(executor, frames, period_s: float) -> list[dict]:
    """Frames served one at a time; with a period, each submitted on its tick (a camera's rate)."""
    rows = []
    next_tick = time.perf_counter()
    for obs in frames:
        if period_s:
            time.sleep(max(0.0, next_tick - time.perf_counter()))
            next_tick += period_s
        cpu0, wall0 = time.process_time(), time.perf_counter()
        chunk = executor.infer(obs)
        rows.append(
            {
                "total": chunk.timings_ms["total"],
                "caller_wall": (time.perf_counter() - wall0) * 1e3,
                "cpu": (time.process_time() - cpu0) * 1e3,
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp8")
    ap.add_argument("--fp8-expert", action="store_true")
    ap.add_argument("--turns", type=int, default=6, help="turns of each way")
    ap.add_argument("--turn-frames", type=int, default=40)
    ap.add_argument("--out", default="device-wait.json")
    args = ap.parse_args()
    config = RuntimeConfig(preset="pi05", device="cuda", precision=args.precision, fp8_expert=args.fp8_expert)
    rng = np.random.default_rng(0)
    paces = {"20hz": 0.05, "back_to_back": 0.0}
    rows = {pace: {way: [] for way in WAYS} for pace in paces}
    with PipelinedExecutor(config) as executor:
        frames = [synthetic_observation(config, rng, 224) for _ in range(8)]
        events = {way: events_for(executor, way) for way in WAYS}
        for obs in frames[:3]:
            executor.infer(obs)  # captured and warm before the clock
        for pace, period in paces.items():
            for turn in range(2 * args.turns):
                way = WAYS[turn % 2]
                executor._events = events[way]  # nothing in flight: infer returned
                turn_frames = [frames[i % 8] for i in range(args.turn_frames)]
                rows[pace][way] += one_turn(executor, turn_frames, period)[
                    2:
                ]  # a turn's first frames warm it
    summary = {
        pace: {
            way: {k: float(np.median([r[k] for r in rs])) for k in ("total", "caller_wall", "cpu")}
            | {"p99_total": float(np.percentile([r["total"] for r in rs], 99)), "frames": len(rs)}
            for way, rs in by_way.items()
        }
        for pace, by_way in rows.items()
    }
    doc = {**run_header(), "config": vars(args), "median_ms": summary}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    for pace, by_way in summary.items():
        for way, m in by_way.items():
            print(
                f"{pace:13s} {way:6s} total p50 {m['total']:7.3f} p99 {m['p99_total']:7.3f} "
                f"caller {m['caller_wall']:7.3f} cpu/frame {m['cpu']:7.3f} ms"
            )


if __name__ == "__main__":
    main()
