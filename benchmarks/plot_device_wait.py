"""The device_wait figure for docs/performance.md: from submit to chunk (median) and the process's CPU time
per frame, the host's wait spinning and blocking, at 20 Hz and back to back (device_wait_bench.py).

python benchmarks/plot_device_wait.py DEVICE_WAIT.json [--out PNG]
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot import figure_from_results, save_figure  # noqa: E402

PANELS = (("total", "ms from submit to chunk, median"), ("cpu", "process CPU ms per frame, median"))


def main(results: list[Path], out: Path) -> None:
    doc = json.loads(results[0].read_text())
    paces = list(doc["median_ms"])
    ways = list(doc["median_ms"][paces[0]])
    fig, axes = plt.subplots(1, len(PANELS), figsize=(10, 4))
    width = 0.8 / len(ways)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for k, way in enumerate(ways):
            xs = [i + (k - (len(ways) - 1) / 2) * width for i in range(len(paces))]
            values = [doc["median_ms"][pace][way][key] for pace in paces]
            ax.bar(xs, values, width, label=way)
            for x, v in zip(xs, values, strict=True):
                ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(paces)), [p.replace("_", " ") for p in paces])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"device_wait: {doc['device']} ({doc['date']}, {doc['commit']}), pi05 "
        f"{doc['config']['precision']}{' + FP8 expert' if doc['config']['fp8_expert'] else ''}",
        fontsize=9,
    )
    save_figure(fig, out)


if __name__ == "__main__":
    figure_from_results(main, __doc__, "docs/img/device_wait.png")
