"""The pipelining figure for docs/performance.md from benchmarks/pipelining_bench.py's JSON: latency from
`submit` (p50 and p99) per setting and input rate, one run.

python benchmarks/plot_pipelining.py RESULTS.json [docs/img/pipelining.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(results: Path, out: Path) -> None:
    doc = json.loads(results.read_text())
    rows = doc["rows"]
    settings = list(dict.fromkeys(r["pipelining"]["setting"] for r in rows))
    rates = sorted({r["rate_hz"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        mine = {r["rate_hz"]: r for r in rows if r["pipelining"]["setting"] == setting}
        x = np.arange(len(rates)) + i * width
        p50 = [mine[rate]["total_p50_ms"] for rate in rates]
        p99 = [mine[rate]["total_p99_ms"] for rate in rates]
        bars = ax.bar(x, p50, width, label=f"{setting} (p50; tick: p99)")
        ax.errorbar(x, p99, fmt="_", color="black", markersize=14)
        for bar, rate in zip(bars, rates, strict=True):
            used = mine[rate]["pipelining"]
            ax.annotate(
                f"{used['mode']}\n{used['peak_in_flight']} on device",
                (bar.get_x() + bar.get_width() / 2, 2),
                ha="center",
                fontsize=7,
                color="white",
            )
    ax.set_xticks(np.arange(len(rates)) + 0.4 - width / 2, [f"{rate:g} Hz" for rate in rates])
    ax.set_ylabel("submit -> chunk, ms")
    ax.set_title(f"{doc['device']} ({doc['date']}, {doc['commit']}): {doc['preset']}, pipelining settings")
    ax.set_ylim(0, 1.3 * max(r["total_p99_ms"] for r in rows))
    ax.legend(fontsize=8, loc="upper center", ncol=len(settings))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img/pipelining.png"))
