"""Why a tick of robots in step still splits: the spread of each tick's arrivals at the server, and whether
Python's GIL switch interval sets it.

8 LIBERO-shaped robots in step (fleet_bench's robots and batched server, every FP8 option, one batch in
flight) for 10 s per run, alternating the interpreter's switch interval between its default (5 ms: a
thread holding the GIL keeps it up to that long while others wait) and a short one, A-B-A-B in one
process. Per run: fleet_bench's row, and per tick the spread of its arrivals (first to last) and the
largest gap between two consecutive ones, as the server's batching saw them (`BatchHold.arrived`).

    python3 benchmarks/in_step_probe.py OUT.json [--robots 8] [--seconds 10] [--short-ms 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from fleet_bench import PRECISIONS, WORKLOADS, Fleet
from results_doc import run_header, save
from vla_runtime.runtime import batching
from vla_runtime.runtime.config import RuntimeConfig

TICK_GAP_S = 0.02  # arrivals further apart than this belong to different ticks (the period is 50 ms)


def tick_stats(arrivals: list[float]) -> dict:
    arrivals = sorted(arrivals)
    ticks = [[arrivals[0]]]
    for at in arrivals[1:]:
        if at - ticks[-1][-1] < TICK_GAP_S:
            ticks[-1].append(at)
        else:
            ticks.append([at])
    spread = np.array([t[-1] - t[0] for t in ticks]) * 1e3
    gap = np.array([max((b - a for a, b in zip(t, t[1:], strict=False)), default=0.0) for t in ticks]) * 1e3
    pct = lambda a: {p: round(float(np.percentile(a, p)), 3) for p in (50, 90, 99, 100)}  # noqa: E731
    return {
        "ticks": len(ticks),
        "spread_ms": pct(spread),
        "largest_gap_ms": pct(gap),
        "ticks_with_a_gap_over_gather": int((gap > batching.GATHER_S * 1e3).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--robots", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--short-ms", type=float, default=0.5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()  # on the CPU: the tiny preset in float32, to try the script
    preset = "pi05" if cuda else "pi05_tiny"
    observations, workload = WORKLOADS["libero"](preset)
    precision = PRECISIONS["fp8_all"] if cuda else {"precision": "float32"}
    config = RuntimeConfig(
        preset=preset, device="cuda" if cuda else "cpu", pipelining="latency", **precision, **workload
    )
    fleet = Fleet(config, observations, in_step=True)
    arrivals: list[float] = []
    recorded = batching.BatchHold.arrived

    def arrived(self, robot, at):
        arrivals.append(at)
        return recorded(self, robot, at)

    batching.BatchHold.arrived = arrived
    default_s = sys.getswitchinterval()
    doc = {
        **run_header(),
        "workload": f"pi05, libero, {args.robots} robots in step, 20 Hz, deadline 50 ms, one batch in flight",
        "runs": [],
    }
    try:
        for switch_s in (default_s, args.short_ms / 1e3) * 2:
            sys.setswitchinterval(switch_s)
            arrivals.clear()
            row = fleet.run_batched(args.robots, args.seconds, observations)
            # the warm-up's arrivals are in too: its 2 s are part of what the server saw
            row = {"switch_interval_ms": switch_s * 1e3, **row, "arrivals": tick_stats(arrivals)}
            keys = ("switch_interval_ms", "worst_p99_ms", "misses", "batch_sizes", "arrivals")
            print({k: row[k] for k in keys}, flush=True)
            doc["runs"].append(row)
            save(doc, args.out)
    finally:
        sys.setswitchinterval(default_s)
        fleet.close()


if __name__ == "__main__":
    main()
