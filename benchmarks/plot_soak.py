"""docs/img/soak.png from a benchmarks/soak.py result: resident memory and threads against frames."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(result: str, out: str = "docs/img/soak.png") -> None:
    data = json.loads(Path(result).read_text())
    frames = [s["frame"] for s in data["samples"]]
    fig, rss_axis = plt.subplots(figsize=(7, 3.2))
    rss_axis.plot(frames, [s["rss_mib"] for s in data["samples"]], color="#1f77b4", label="resident memory")
    rss_axis.set_xlabel("frames submitted")
    rss_axis.set_ylabel("resident memory (MiB)")
    rss_axis.set_ylim(0, max(s["rss_mib"] for s in data["samples"]) * 1.2)
    threads = rss_axis.twinx()
    threads.step(
        frames, [s["threads"] for s in data["samples"]], color="#d62728", where="post", label="threads"
    )
    threads.set_ylabel("threads")
    threads.set_ylim(0, max(s["threads"] for s in data["samples"]) + 2)
    c = data["counters"]
    rss_axis.set_title(
        f"Soak, {data['config']['preset']} on the CPU ({data['commit']}): {c['submitted']} frames, "
        f"{c['completed']} chunks, {c['dropped']} dropped",
        fontsize=9,
    )
    fig.legend(loc="center right", fontsize=8, bbox_to_anchor=(0.88, 0.4))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
