"""Plots for docs/performance.md from a results JSON and its trace.

python benchmarks/plot.py benchmarks/results/2026-11-22-h100-80gb-hbm3.json [OUT_DIR (default docs/img)]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from vla_runtime.runtime.hazards import STEP_NAMES  # noqa: E402

STAGES = ("vision", "prefix", "denoise")
COLORS = {
    "vision": "#4c72b0",
    "prefix": "#dd8452",
    "denoise": "#55a868",
}
COPY_COLOR = "#8c8c8c"  # every copy step


def save_figure(fig, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def figure_from_results(main, doc: str, default_out: str) -> None:
    """The command line of a figure made from several results files: `RESULTS.json [...] [--out PNG]`,
    described by the first line of the script's docstring `doc`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    args = parser.parse_args()
    main(args.results, args.out)


def stacked_stages(ax, labels: list[str], rows: list[dict], notes: list[str]) -> float:
    """One bar per row, its stage times stacked, `notes` above each. Returns the tallest bar."""
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        values = [r["stages_ms"].get(stage, 0.0) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=stage, color=COLORS[stage])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, note in enumerate(notes):
        ax.text(i, bottom[i], note, ha="center", va="bottom", fontsize=8)
    return max(bottom)


def latency_by_stage(doc: dict, out: Path) -> None:
    rows = [r for r in doc["results"] if r["name"] in ("pi05-eager", "pi05-graphs", "pi05-pipelined")]
    sweep = sorted(
        (r for r in doc["results"] if r["name"].startswith("pi05-pipelined-steps")), key=lambda r: r["steps"]
    )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, group, labels in (
        (ax1, rows, [r["mode"] for r in rows]),
        (ax2, sweep, [f"{r['steps']}" for r in sweep]),
    ):
        notes = [f"p50 {r['latency_ms']['p50']:.1f}\np99 {r['latency_ms']['p99']:.1f}" for r in group]
        tallest = stacked_stages(ax, labels, group, notes)
        ax.set_ylim(top=max(tallest * 1.15, 55))  # room for the notes above the bars and the deadline
        ax.set_ylabel("ms per chunk")
    ax1.set_title(
        f"pi05 bf16, 3 views, 200-token prompt, 10 steps\n{doc['device']} ({doc['date']}, {doc['commit']})"
    )
    ax2.set_title("pipelined executor: denoising steps sweep")
    ax2.set_xlabel("denoising steps")
    ax2.axhline(50, color="red", lw=1, ls="--", label="50 ms deadline (20 Hz)")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "latency_by_stage.png", dpi=110)


def precision_modes(doc: dict, out: Path) -> None:
    """Stage times per precision mode, with each mode's actions error against float32."""
    rows = [r for r in doc["results"] if r.get("accuracy")]
    if not rows:
        return
    floor = next((r for r in doc["results"] if r["name"] == "pi05-prefix-fp8-floor"), None)
    labels = [r["precision"].replace("/", "\n") for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    notes = [
        f"p50 {r['latency_ms']['p50']:.1f} ms\nactions rel L2 {r['accuracy']['actions_rel_l2']:.3f}"
        for r in rows
    ]
    tallest = stacked_stages(ax, labels, rows, notes)
    if floor:
        ax.axhline(11, color="red", lw=1, ls="--", label="issue 6 target: p50 11 ms")
    ax.set_ylabel("ms per chunk (stages: CUDA events)")
    ax.set_ylim(0, tallest * 1.25)
    ax.set_title(
        f"pi05 precision modes, pipelined executor\n{doc['device']} ({doc['date']}, {doc['commit']})"
    )
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "precision_modes.png", dpi=110)


def horizons(doc: dict, out: Path) -> None:
    """pi05 at horizon 50 and 10 (openpi's pi05_libero), bf16 and every FP8 option, from one run."""
    rows = [r for r in doc["results"] if r.get("action_horizon")]
    if not rows:
        return
    labels = [f"h{r['action_horizon']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    notes = [f"submit->chunk\np50 {r['latency_ms']['p50']:.1f} ms" for r in rows]
    tallest = stacked_stages(ax, labels, rows, notes)
    ax.set_ylabel("ms per chunk (stages: CUDA events)")
    ax.set_ylim(0, tallest * 1.3)
    ax.set_title(f"pi05 action horizon 50 vs 10, pipelined\n{doc['device']} ({doc['date']}, {doc['commit']})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "horizons.png", dpi=110)


def timeline(trace: dict, out: Path, frames: int = 6) -> None:
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    first = sorted({e["args"]["frame"] for e in spans})[:frames]
    spans = [e for e in spans if e["args"]["frame"] in first]
    t0 = min(e["ts"] for e in spans)
    lanes = list(STEP_NAMES)  # the executor's steps, in issue order (runtime/hazards.py)
    fig, ax = plt.subplots(figsize=(12, 3.2))
    for e in spans:
        y = lanes.index(e["cat"])
        start, dur = (e["ts"] - t0) / 1e3, max(e["dur"] / 1e3, 0.15)
        ax.barh(y, dur, left=start, color=COLORS.get(e["cat"], COPY_COLOR), edgecolor="black", lw=0.4)
        if dur > 2:
            ax.text(
                start + dur / 2,
                y,
                f"f{first.index(e['args']['frame'])}",
                ha="center",
                va="center",
                fontsize=7,
            )
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("ms (CUDA events)")
    ax.set_title("pipelined executor under load: one lane per stream, frames f0.. overlap across streams")
    fig.tight_layout()
    fig.savefig(out / "stream_timeline.png", dpi=110)


if __name__ == "__main__":
    results = Path(sys.argv[1])
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img")
    out.mkdir(parents=True, exist_ok=True)
    doc = json.loads(results.read_text())
    latency_by_stage(doc, out)
    precision_modes(doc, out)
    horizons(doc, out)
    trace = results.with_name(results.stem + "-trace.json")
    if trace.exists():
        timeline(json.loads(trace.read_text()), out)
