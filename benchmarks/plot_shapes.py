"""The shape-profile figure for docs/performance.md from latency_breakdown.py --shape-profiles runs: per
run and workload, the stages' medians stacked, and the median from submit to chunk above each bar.

python benchmarks/plot_shapes.py RESULTS.json [MORE.json ...] [--out docs/img/shape_profiles.png]
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot import figure_from_results, save_figure, stacked_stages  # noqa: E402


def main(results: list[Path], out: Path) -> None:
    docs = [json.loads(path.read_text()) for path in results]
    if any(not isinstance(d.get("median_ms", {}).get("libero"), dict) for d in docs):
        raise SystemExit("results: not a latency_breakdown.py --shape-profiles run (no per-workload medians)")
    labels, rows, notes = [], [], []
    for doc in docs:
        # the model's horizon as the run recorded it (runs before the "model" record: the --action-horizon
        # they were given, else pi05's 50)
        horizon = doc.get("model", {}).get("action_horizon") or doc["config"].get("action_horizon") or 50
        # pi05_libero's prompt has no state (`--libero-model`); earlier runs had pi05's
        no_state = doc.get("model", {}).get("state_in_prompt") is False
        for workload, medians in doc["median_ms"].items():
            labels.append(f"{workload}\nhorizon {horizon}" + ("\nno state" if no_state else ""))
            rows.append({"stages_ms": medians})
            notes.append(f"submit -> chunk\n{medians['total']:.1f} ms")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tallest = stacked_stages(ax, labels, rows, notes)
    ax.set_ylim(top=tallest * 1.5)
    ax.axhline(8, color="red", lw=1, ls="--", label="LIBERO-shaped target, 8 ms")
    ax.set_ylabel("ms, median of 100 frames")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    first = docs[0]
    commits = ", ".join(dict.fromkeys(d["commit"] for d in docs))
    config = first["config"]
    precision = config["precision"] + (" + FP8 expert" if config.get("fp8_expert") else "")
    ax.set_title(f"pi05, {precision}, 10 steps: {first['device']} ({first['date']}, {commits})", fontsize=10)
    save_figure(fig, out)


if __name__ == "__main__":
    figure_from_results(main, __doc__, "docs/img/shape_profiles.png")
