"""The start-up figures for docs/performance.md. From benchmarks/startup_bench.py's JSON: per start (compile
scope, cold or warm), the time to the first chunk split into its phases, and the served latency after it.
From benchmarks/node_startup.py's JSON: per start of the policy node, spawn -> serving and spawn -> the
first chunk at the peer.

python benchmarks/plot_startup.py benchmarks/results/<file>.json [docs/img/startup.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ("weights", "quantise", "compile_and_capture")


def bars(start: dict) -> dict[str, float]:
    """Seconds from the child's start to its first chunk, by phase (the rest: between the phases)."""
    events = start["events"]
    phases = events["ready"]["phases_s"]
    parts = {"imports": events["imported"]["s"], **{p: phases.get(p, 0.0) for p in PHASES}}
    parts["other"] = max(0.0, events["first_chunk"]["s"] - sum(parts.values()))
    return parts


def node_starts(doc: dict, out: Path) -> None:
    """A node_startup.py run: per start, spawn -> serving and spawn -> first chunk at the peer."""
    starts = doc["starts"]
    labels = [f"start {i + 1}\n{'cold' if s['cold'] else 'warm'}" for i, s in enumerate(starts)]
    fig, ax = plt.subplots(figsize=(2.2 * len(starts) + 2, 4))
    width, xs = 0.38, range(len(starts))
    for k, (key, name) in enumerate(
        (("spawn_to_serving_s", "node serving"), ("spawn_to_first_chunk_s", "first chunk at the peer"))
    ):
        values = [s[key] or 0.0 for s in starts]  # no serving line in the node's log: none drawn
        ax.bar([x + (k - 0.5) * width for x in xs], values, width, label=name)
        for x, v in zip(xs, values, strict=True):
            ax.text(x + (k - 0.5) * width, v + 0.8, f"{v:.1f}" if v else "-", ha="center", fontsize=8)
    ax.axhline(10, color="grey", lw=0.8, ls=":", label="target, warm: 10 s")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("seconds from the node's spawn")
    ax.legend(fontsize=8)
    fig.suptitle(f"{doc['device']} ({doc['date']}, {doc['commit']}): {doc['workload']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main(results: Path, out: Path) -> None:
    doc = json.loads(results.read_text())
    if doc.get("benchmark") == "node_startup":
        return node_starts(doc, out)
    starts = doc["starts"]
    labels = []
    bytecode_compared = any(s.get("bytecode_cached") for s in starts)  # --bytecode-cache runs
    for start in starts:
        scope = start["compile_scope"]
        label = f"{scope}\n{'warm' if 'cache warm' in start['events']['ready']['cache'] else 'cold'}"
        if bytecode_compared and not start.get("bytecode_cached"):
            label += "\nno bytecode kept"
        if not start.get("precompile", True):
            label += "\ntraced"
        labels.append(label)
    fig, (time_to_chunk, latency) = plt.subplots(
        1, 2, figsize=(max(12, 1.6 * len(starts)), 4.3), gridspec_kw={"width_ratios": [2, 1]}
    )
    bottoms = [0.0] * len(starts)
    for part in ("imports", *PHASES, "other"):
        heights = [bars(s)[part] for s in starts]
        time_to_chunk.bar(labels, heights, bottom=bottoms, label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, total in enumerate(bottoms):
        time_to_chunk.text(x, total + 0.5, f"{total:.1f} s", ha="center", fontsize=9)
    time_to_chunk.axhline(10, color="grey", lw=0.8, ls=":", label="target, warm: 10 s")
    time_to_chunk.set_ylabel("child's start to its first chunk (s)")
    time_to_chunk.legend(fontsize=8)
    served = [s["events"]["served"]["total_p50_ms"] for s in starts]
    latency.bar(labels, served, color="tab:gray")
    for x, ms in enumerate(served):
        latency.text(x, ms + 0.2, f"{ms:.1f}", ha="center", fontsize=9)
    latency.set_ylabel("p50 from submit after start-up (ms)")
    fig.suptitle(f"{doc['device']} ({doc['date']}, {doc['commit']}): pi05, {doc['mode']}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img/startup.png"))
