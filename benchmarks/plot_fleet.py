"""The fleet figure for docs/many_robots.md from benchmarks/fleet_bench.py's JSON: per robot count, the
worst robot's p99 latency and the chunks per second: the batched server against the same server never
holding (eager) and independent executors.

python benchmarks/plot_fleet.py benchmarks/results/<file>.json [docs/img/fleet.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"batched": "-o", "eager": "-.^", "independent": "--s"}  # eager: the server never holding


def main(results: Path, out: Path) -> None:
    doc = json.loads(results.read_text())
    rows = doc["rows"]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(12, 4.3))
    for precision in dict.fromkeys(r["precision"] for r in rows):
        for mode, style in STYLE.items():
            points = sorted(
                (r["robots"], r["worst_p99_ms"], r["chunks_per_s"])
                for r in rows
                if r["precision"] == precision and r["mode"] == mode
            )
            if not points:
                continue
            robots, p99, rate = zip(*points, strict=True)
            label = f"{precision}, {mode}"
            latency.plot(robots, p99, style, label=label)
            throughput.plot(robots, rate, style, label=label)
    latency.axhline(50, color="grey", lw=0.8, ls=":", label="deadline 50 ms")
    latency.set_yscale("log")
    latency.set_xlabel("robots at 20 Hz")
    latency.set_ylabel("worst robot's p99, submit -> chunk (ms, log)")
    latency.legend(fontsize=8)
    robots_max = max(r["robots"] for r in rows)
    throughput.plot([1, robots_max], [20, 20 * robots_max], color="grey", lw=0.8, ls=":", label="offered")
    throughput.set_xlabel("robots at 20 Hz")
    throughput.set_ylabel("chunks per second delivered")
    throughput.legend(fontsize=8)
    gpus = f", robots split over {doc['gpus']} GPUs" if doc.get("gpus", 1) > 1 else ""
    fig.suptitle(f"{doc['device']} ({doc['date']}, {doc['commit']}): {doc['workload']}{gpus}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img/fleet.png"))
