"""The fused expert step's figure for docs/performance.md: the denoise stage fused against unfused (same
run), and where the fused step's time goes per layer (its phases, with the grid barriers' share).

python benchmarks/plot_expert_step.py PHASES.json STAGE.json [--out docs/img/expert_step.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BARRIERS_PER_LAYER = (
    8  # the phases of a layer each end at a grid barrier (graphs/expert_step.cu at commit 7b003a0)
)


def main(phases_path: Path, stage_path: Path, out: Path) -> None:
    phases, stage = json.loads(phases_path.read_text()), json.loads(stage_path.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    variants = stage["variants"]
    left.bar(range(len(variants)), [v["median_ms"] for v in variants], color=["tab:blue", "tab:red"])
    left.set_xticks(range(len(variants)))
    labels = ["fused step" if "fused-step" in v["name"] else "unfused" for v in variants]
    left.set_xticklabels(
        [f"{name}\n{v['ops_per_call']:.0f} kernels" for name, v in zip(labels, variants, strict=True)]
    )
    left.set_ylabel("denoise stage, 10 steps, ms (median of 100 graph replays)")
    left.set_title("pi05, FP8 expert, same run")
    depth = 18
    cases = phases["cases"]
    names = list(cases[0]["phases_us_per_step"])
    bottom = [0.0] * len(cases)
    for name in names:
        heights = [c["phases_us_per_step"][name] / depth for c in cases]
        right.bar(range(len(cases)), heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    barrier = phases["barrier_us"]["release_acquire"] * BARRIERS_PER_LAYER
    right.axhline(barrier, color="black", linestyle="--", label=f"{BARRIERS_PER_LAYER} grid barriers alone")
    unfused = next(v for v in variants if "fused-step" not in v["name"])["median_ms"] * 1e3 / (10 * depth)
    right.axhline(
        unfused, color="tab:blue", linestyle=":", label="unfused graph, same run (per layer and step)"
    )
    right.set_xticks(range(len(cases)))
    right.set_xticklabels([f"horizon {c['horizon']}, batch {c['batch']}\n({c['rows']} rows)" for c in cases])
    right.set_ylabel("fused step: us per layer and step (block 0's clock)")
    right.set_title("where the fused step's time goes")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{phases['device']}, commit {phases['commit']}, {phases['date']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("phases", type=Path)
    parser.add_argument("stage", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img/expert_step.png"))
    args = parser.parse_args()
    main(args.phases, args.stage, args.out)
