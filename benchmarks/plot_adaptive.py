"""The adaptive-steps figure for docs/realtime.md from benchmarks/adaptive_steps_bench.py's JSON.

python benchmarks/plot_adaptive.py benchmarks/results/<file>.json [docs/img/adaptive_steps.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results: Path, out: Path) -> None:
    doc = json.loads(results.read_text())
    phases = doc["phases"]
    names = list(phases)
    fig, (ages, misses, steps) = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(names))
    ages.bar([i - 0.2 for i in x], [phases[n]["age_p50_ms"] for n in names], 0.4, label="p50")
    ages.bar([i + 0.2 for i in x], [phases[n]["age_p99_ms"] for n in names], 0.4, label="p99")
    ages.axhline(50, color="red", ls="--", lw=1, label="deadline (50 ms)")
    ages.set_xticks(list(x), names, fontsize=8)
    ages.set_ylabel("observation -> chunk, ms")
    ages.legend(fontsize=8)
    ages.set_title("chunk age at 20 Hz")
    misses.bar(list(x), [phases[n]["misses"] for n in names], color="#c44e52")
    for i, n in enumerate(names):
        misses.text(
            i, phases[n]["misses"], f"{phases[n]['misses']} / {phases[n]['observations']}", ha="center"
        )
    misses.set_xticks(list(x), names, fontsize=8)
    misses.set_title("deadline misses")
    adaptive = phases[names[-1]]["chunks_by_steps"]
    rungs = sorted(adaptive, key=int, reverse=True)
    quality = doc["quality"]
    steps.bar(rungs, [adaptive[r] for r in rungs], color="#55a868")
    for r in rungs:
        error = quality.get(r, {}).get("rel_l2_vs_10_steps", float("nan"))
        steps.text(r, adaptive[r], f"err {error:.2f}", ha="center", va="bottom", fontsize=8)
    steps.set_xlabel("denoising steps")
    steps.set_title(f"{names[-1]}: chunks per rung (err: rel. L2 vs 10 steps)")
    fig.suptitle(
        f"{doc['device']} ({doc['date']}, {doc['commit']}): {doc['workload']}; load: "
        f"{doc.get('contenders', 3)} processes at {doc['load_level']} duty",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img/adaptive_steps.png"))
