"""The in-step fleet figure for docs/many_robots.md from fleet_bench.py --in-step runs on several GPUs: per
run (its commit) and GPU, the worst robot's p99 and the misses, the batched server against sending at once.

python benchmarks/plot_in_step.py RUN.json [MORE.json ...] [--out docs/img/fleet_in_step.png]
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot import figure_from_results, save_figure  # noqa: E402

MODES = {"batched": ("server", "tab:blue"), "eager": ("sent at once", "tab:orange")}


def main(results: list[Path], out: Path) -> None:
    docs = [json.loads(path.read_text()) for path in results]
    if any("in step" not in d.get("workload", "") or "per_gpu" not in d["rows"][0] for d in docs):
        raise SystemExit("results: not multi-GPU fleet_bench.py --in-step runs")
    labels = [f"{d['commit']}\nGPU {g}" for d in docs for g in range(d["gpus"])]
    fig, (p99_ax, miss_ax) = plt.subplots(1, 2, figsize=(max(10, 1.5 * len(labels)), 4))
    width = 0.4
    for k, (mode, (name, color)) in enumerate(MODES.items()):
        per_gpu = [r for d in docs for row in d["rows"] if row["mode"] == mode for r in row["per_gpu"]]
        xs = [i + (k - 0.5) * width for i in range(len(per_gpu))]
        p99_ax.bar(xs, [r["worst_p99_ms"] for r in per_gpu], width, color=color, label=name)
        miss_ax.bar(xs, [r["misses"] for r in per_gpu], width, color=color, label=name)
        for x, r in zip(xs, per_gpu, strict=True):
            miss_ax.annotate(str(r["misses"]), (x, r["misses"]), ha="center", va="bottom", fontsize=7)
    p99_ax.axhline(50, color="red", lw=1, ls="--", label="deadline, 50 ms")
    p99_ax.set_ylabel("worst robot's p99, ms")
    miss_ax.set_ylabel(f"misses of {docs[0]['rows'][0]['per_gpu'][0]['chunks_per_s'] * 10:.0f} chunks")
    for ax, where in ((p99_ax, "lower right"), (miss_ax, "center right")):
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.legend(fontsize=8, loc=where)
    robots = docs[0]["rows"][0]["per_gpu"][0]["robots"]
    fig.suptitle(
        f"{robots} LIBERO-shaped robots in step per GPU, 20 Hz, 10 s: {docs[0]['device']} x{docs[0]['gpus']} "
        f"({docs[0]['date']})",
        fontsize=10,
    )
    save_figure(fig, out)


if __name__ == "__main__":
    figure_from_results(main, __doc__, "docs/img/fleet_in_step.png")
