"""The integer-precision figure for docs/performance.md from benchmarks/integer_bench.py's JSON: the
action expert's GEMMs per mode (microseconds per call, 50 rows) and pi05's stages per mode.

python benchmarks/plot_integer.py GEMMS.json EXECUTOR.json [EXECUTOR.json ...] [--out docs/img/integer.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STAGES = ("vision", "prefix", "denoise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gemms", type=Path)
    parser.add_argument("executor", type=Path, nargs="+", help="one or more runs; each panel says which")
    parser.add_argument("--out", type=Path, default=Path("docs/img/integer.png"))
    args = parser.parse_args()
    gemms = json.loads(args.gemms.read_text())
    runs = [json.loads(p.read_text()) for p in args.executor]
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(5.5 * (1 + len(runs)), 4.3))
    names = list(dict.fromkeys(r["gemm"] for r in gemms["gemms"]))
    modes = list(dict.fromkeys(r["mode"] for r in gemms["gemms"]))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        us = [next(r["us"] for r in gemms["gemms"] if r["gemm"] == g and r["mode"] == mode) for g in names]
        axes[0].bar(np.arange(len(names)) + i * width, us, width, label=mode)
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    axes[0].set_ylabel("us per call (CUDA graph, weights from memory)")
    axes[0].set_title(f"expert GEMMs, {gemms['gemm_rows_per_call']} rows ({gemms['commit']})")
    axes[0].set_ylim(0, 1.3 * max(r["us"] for r in gemms["gemms"]))
    axes[0].legend(fontsize=8, ncol=3, loc="upper center")
    for ax, run in zip(axes[1:], runs, strict=True):
        labels = [row["mode"] for row in run["executor"]]
        bottom = np.zeros(len(labels))
        for stage in STAGES:
            ms = np.array([row["median_ms"][stage] for row in run["executor"]])
            ax.bar(labels, ms, bottom=bottom, label=stage)
            bottom += ms
        for x, row in enumerate(run["executor"]):
            ax.text(x, bottom[x] + 0.3, f"{row['median_ms']['total']:.1f}", ha="center", fontsize=9)
        ax.set_ylabel("ms (median; label: the executor's total)")
        ax.set_title(f"pi05 stages, one run ({run['commit']})")
        ax.set_ylim(0, 1.25 * bottom.max())
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.suptitle(f"int8 and w4a8 next to bf16 and FP8 on {gemms['device']}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
