"""The resize figure for docs/performance.md: left, each way of resizing frames to 224 per workload
(resize_bench.py); right, from submit to chunk with the host's resize and the device's
(latency_breakdown.py --compare-resize runs), the prepare span, the copy in and the stages stacked.

python benchmarks/plot_resize.py RESIZE_WAYS.json COMPARE.json [MORE_COMPARE.json ...] [--out PNG]
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot import COLORS, COPY_COLOR, STAGES, figure_from_results, save_figure  # noqa: E402

PREPARE_COLOR = "#c44e52"


def ways_panel(ax, doc: dict) -> None:
    workloads = list(doc["results"])
    ways = list(doc["results"][workloads[0]])
    width = 0.8 / len(ways)
    for k, way in enumerate(ways):
        xs = [i + (k - (len(ways) - 1) / 2) * width for i in range(len(workloads))]
        values = [doc["results"][w][way]["wall_ms_p50"] for w in workloads]
        ax.bar(xs, values, width, label=way.replace("_", " "))
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(workloads)), [w.replace("_", " ") for w in workloads])
    ax.set_ylabel(f"ms to the pixels on the device, median of {doc['repeats']}")
    ax.set_title(f"resize to 224: {doc['device']} ({doc['date']}, {doc['commit']})", fontsize=9)
    ax.legend(fontsize=8)


def end_to_end_panel(ax, docs: list[dict]) -> None:
    labels, bars = [], []
    for doc in docs:
        side = doc["config"]["image_side"]
        shape = "LIBERO" if doc["config"].get("shape_profiles") else "3x200"  # views x tokens
        for way, medians in doc["median_ms"].items():
            labels.append(f"{way.replace('_resize', '')}\n{side}px\n{shape}\n{doc['commit']}")
            bars.append(medians)
    bottom = [0.0] * len(bars)
    parts = [("prepare", PREPARE_COLOR), ("copy_in", COPY_COLOR)] + [(s, COLORS[s]) for s in STAGES]
    for part, color in parts:
        values = [b[part] for b in bars]
        ax.bar(range(len(bars)), values, bottom=bottom, color=color, label=part)
        bottom = [x + v for x, v in zip(bottom, values, strict=True)]
    for i, b in enumerate(bars):
        ax.text(i, bottom[i], f"{b['total']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), labels, fontsize=7)
    ax.set_ylim(top=max(bottom) * 1.3)
    frames = ", ".join(sorted({str(d["frames_per_workload"]) for d in docs}))
    ax.set_ylabel(f"ms, median of {frames} frames (number: submit -> chunk)")
    ax.set_title(
        "host resize against device resize, one process per pair (3x200: 3 views, 200 tokens)", fontsize=9
    )
    ax.legend(fontsize=7, ncol=5, loc="upper center")


def main(results: list[Path], out: Path) -> None:
    ways, *compares = [json.loads(path.read_text()) for path in results]
    if "results" not in ways or not compares:
        raise SystemExit("results: a resize_bench.py file, then latency_breakdown.py --compare-resize files")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=(1, 1.4))
    ways_panel(left, ways)
    end_to_end_panel(right, compares)
    save_figure(fig, out)


if __name__ == "__main__":
    figure_from_results(main, __doc__, "docs/img/resize.png")
