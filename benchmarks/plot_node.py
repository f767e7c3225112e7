"""Figures for docs/robot.md: the timeline of one observation (what "age" and "miss" mean), and the
node-latency results (benchmarks/node_latency.py) next to the engine in-process.

    python benchmarks/plot_node.py benchmarks/results/2026-11-29-h200-node-latency-pi05-fp8-cd40a30.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def timeline(out: Path) -> None:
    """Two observations: one answered within its deadline, one missed (the tail of the current chunk
    goes out at the deadline watch's next tick, then the late chunk when it is ready)."""
    fig, ax = plt.subplots(figsize=(9, 3.2))
    period = 50
    for k in range(0, 9):  # action periods of the first chunk, aligned to its observation
        ax.axvspan(k * period, (k + 1) * period, ymin=0.05, ymax=0.2, color="#55a868" if k % 2 else "#8fd19e")
    ax.text(
        196, 0.27, "chunk 1: action k holds for\n[t0 + k*50, t0 + (k+1)*50) ms", fontsize=7.5, va="center"
    )
    events = [
        (0, 0.97, "t0: observation 1 taken (its stamp)"),
        (4, 0.86, "in, submitted"),
        (21, 0.75, "chunk 1 ready: published at once,\nage 21 ms, actions 0.. (none cut)"),
        (50, 0.55, "deadline 1\n(t0 + 50 ms)"),
        (100, 0.97, "t1: observation 2"),
        (
            150,
            0.55,
            "deadline 2 passes, no chunk:\nMISS; the watch publishes the\ntail of chunk 1 (actions 3..)",
        ),
        (185, 0.75, "chunk 2 ready (late): published,\nage 85 ms, actions 1.. (0 has ended)"),
    ]
    for x, y, label in events:
        ax.axvline(x, ymin=0.22, ymax=y, color="#333", lw=1)
        ax.text(x + 2, y, label, fontsize=7.5, va="top")
    ax.annotate("", xy=(21, 0.45), xytext=(0, 0.45), arrowprops={"arrowstyle": "<->"})
    ax.text(3, 0.47, "age 1", fontsize=8)
    ax.annotate("", xy=(185, 0.3), xytext=(100, 0.3), arrowprops={"arrowstyle": "<->", "color": "#c44e52"})
    ax.text(120, 0.32, "age 2 > deadline", fontsize=8, color="#c44e52")
    ax.set_xlim(-5, 300)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("ms on the node's clock (ROS time; the simulation clock under use_sim_time)")
    ax.set_title(
        "One definition: age = publication - observation stamp; miss = no fresh chunk by the deadline"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def node_latency(paths: list[Path], out: Path) -> None:
    docs = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(docs), figsize=(4.5 * len(docs), 3.6), squeeze=False)
    for ax, doc in zip(axes[0], docs, strict=True):
        cfg = doc["config"]
        rows = {
            "engine in-process\n(submit -> chunk)": doc["in_process"]["submit_to_chunk_ms"],
            "through the node\n(stamp -> arrival)": doc["node"]["age_on_arrival_ms"],
        }
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["p50"] for r in rows.values()], width=0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [r["p99"] for r in rows.values()], width=0.4, label="p99")
        for i, r in enumerate(rows.values()):
            ax.text(i - 0.2, r["p50"], f"{r['p50']:.1f}", ha="center", va="bottom", fontsize=8)
            ax.text(i + 0.2, r["p99"], f"{r['p99']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), list(rows))
        adds = doc["node_adds_ms"]
        ax.set_title(
            f"{cfg['preset']} {cfg['precision']} on {cfg['device']}, {cfg['rate_hz']:.0f} Hz peer\n"
            f"the node adds {adds['p50']:.1f} ms p50, {adds['p99']:.1f} ms p99 ({doc['commit']})",
            fontsize=9,
        )
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    timeline(DOCS_IMG / "chunk_timeline.png")
    if len(sys.argv) > 1:
        node_latency([Path(p) for p in sys.argv[1:]], DOCS_IMG / "node_latency.png")
