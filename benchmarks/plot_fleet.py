"""The fleet figure for docs/many_robots.md from benchmarks/fleet_bench.py's JSON: per robot count, the
worst robot's p99 latency and the chunks per second: the batched server against the same server never
holding (eager) and independent executors.

python benchmarks/plot_fleet.py benchmarks/results/<file>.json [more.json ...] [--out docs/img/fleet.png]

Several files: their rows in one figure (runs of one call on one machine, e.g. one precision per GPU);
the title is the first file's, with every commit named.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot import figure_from_results, save_figure  # noqa: E402

# eager: the server never holding nor capping; *_in_step: fleet_sim.py's robots ticking together
STYLE = {
    "batched": "-o",
    "eager": "-.^",
    "independent": "--s",
    "batched_in_step": ":o",
    "eager_in_step": ":^",
}


def main(results: list[Path], out: Path) -> None:
    docs = [json.loads(path.read_text()) for path in results]
    doc, rows = docs[0], [row for d in docs for row in d["rows"]]
    keys = [(r["precision"], r["mode"], r["robots"]) for r in rows]
    if len(set(keys)) < len(keys):
        raise SystemExit("results: the files repeat a (precision, mode, robots) point; plot them apart")
    if len({(d["device"], d["workload"], d.get("gpus", 1)) for d in docs}) > 1:
        raise SystemExit("results: the files differ in device, workload or GPUs; plot them apart")
    commits = ", ".join(dict.fromkeys(d["commit"] for d in docs))
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
    fig.suptitle(f"{doc['device']} ({doc['date']}, {commits}): {doc['workload']}{gpus}", fontsize=10)
    save_figure(fig, out)


if __name__ == "__main__":
    figure_from_results(main, __doc__, "docs/img/fleet.png")
