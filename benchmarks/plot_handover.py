"""The hand-over figure for docs/realtime.md from benchmarks/handover_bench.py's JSON.

python benchmarks/plot_handover.py benchmarks/results/<file>.json [docs/img/handover.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_COLORS = {  # rtc-vjpK: the exact vector-Jacobian product on the first K steps (older files: rtc)
    "switch": "#c44e52",
    "inpaint": "#8172b2",
    "rtc-vjp0": "#64b5cd",
    "rtc-vjp2": "#55a868",
    "rtc-vjp10": "#ccb974",
    "rtc": "#55a868",
}
RTC_SHOWN = ("rtc-vjp2", "rtc")  # the chunks overlaid: the default rtc, whichever the file has


def main(results: Path, out: Path) -> None:
    doc = json.loads(results.read_text())
    executed, delay = doc["executed"], 2
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.3), gridspec_kw={"width_ratios": [1.4, 1.4, 1, 1]})
    rtc = next((m for m in RTC_SHOWN if m in doc["chunks_for_plot"]), None)
    if "switch" not in doc["chunks_for_plot"] or rtc is None:
        raise SystemExit(
            f"{results}: no switch and rtc chunks to overlay (the bench's first precision plots them)"
        )
    for ax, mode in zip(axes[:2], ("switch", rtc), strict=True):
        chunks = doc["chunks_for_plot"][mode]
        for k, chunk in enumerate(chunks):
            start = k * executed  # chunk k answers the observation taken after k * executed actions
            xs = list(range(start, start + min(len(chunk), 3 * executed)))
            ax.plot(xs, chunk[: len(xs)], lw=1.2, alpha=0.85, label=f"chunk {k}" if k < 6 else None)
            ax.axvline(start + delay, color="grey", lw=0.5, ls=":")
        ax.set_title(
            f"{mode}: consecutive chunks, action dim 0\n(new observation every {executed}, delay {delay})"
        )
        ax.set_xlabel("control step")
    axes[0].set_ylabel("action (model units, random weights)")
    axes[0].legend(fontsize=7, ncol=2)
    rows = doc["rows"]
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    modes = [m for m in MODE_COLORS if any(r["mode"] == m for r in rows)]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        found = [
            next((r for r in rows if r["mode"] == mode and r["precision"] == p), None) for p in precisions
        ]
        values = [r["stages_ms_p50"]["denoise"] if r else float("nan") for r in found]
        axes[2].bar(
            [j + i * width for j in range(len(precisions))],
            values,
            width,
            label=mode,
            color=MODE_COLORS[mode],
        )
    axes[2].set_xticks([j + 0.4 - width / 2 for j in range(len(precisions))], precisions)
    axes[2].set_ylabel("denoise stage, ms (p50, CUDA events)")
    axes[2].set_title("cost of the guided loop (pi05, 10 steps)")
    axes[2].legend(fontsize=8)
    delays = sorted(rows[0]["splice"], key=int)
    first = precisions[0]
    for i, mode in enumerate(modes):
        row = next(r for r in rows if r["mode"] == mode and r["precision"] == first)
        values = [row["splice"][d]["deviation"] for d in delays]
        axes[3].bar(
            [j + i * width for j in range(len(delays))], values, width, label=mode, color=MODE_COLORS[mode]
        )
    axes[3].set_xticks([j + 0.4 - width / 2 for j in range(len(delays))], [f"delay {d}" for d in delays])
    axes[3].set_yscale("log")
    axes[3].set_ylabel("deviation at the splice (L2, log)")
    axes[3].set_title(f"first new action vs the old chunk's ({first})")
    axes[3].legend(fontsize=7, loc="center right")
    fig.suptitle(
        f"{doc['device']} ({doc['date']}, {doc['commit']}), {doc['preset']} with random weights", fontsize=10
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img/handover.png"))
