"""The 60 s confirmations of fleet_bench.py for docs/many_robots.md: per run and GPU, the chunks late or
dropped in 60 s, the worst robot's p99, and the longest pause of Python's full garbage collection (where
the run was traced).

Reads every confirmation in the results given: a document's own (one GPU alone), its `per_gpu_docs`
(two GPUs, one server each), and its `runs` (four GPUs, a process each).

python benchmarks/plot_confirmations.py RESULTS.json [...] [--out docs/img/fleet_confirmations.png]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from plot import figure_from_results, save_figure  # noqa: E402

GPU_IN_NAME = re.compile(r"gpu(\d+)")  # a run's name in a four-GPU document: "in-step-frozen-gpu0"


def confirmations(doc: dict) -> list[tuple[str, dict]]:
    """(label, confirmation) of each process in a results document."""
    found = []
    processes = [(f"GPU {g}", d) for g, d in enumerate(doc.get("per_gpu_docs", []))]
    # four processes on one host at once (their compilations overlapped the others' measurements)
    processes += [("GPU " + GPU_IN_NAME.search(name)[1] + "*", d) for name, d in doc.get("runs", {}).items()]
    for where, d in processes or [("one GPU", doc)]:
        if "confirm" not in d:
            continue
        kind = "in step" if "in step" in d["workload"] else "spread"
        profiles = "" if d.get("batch_profiles", "powers_of_two") == "powers_of_two" else "\nevery size"
        # the key came with the freeze: a run without it had none; False: thawed for the comparison
        frozen = {None: "\nno freeze", False: "\nthawed", True: ""}[d.get("start_up_objects_frozen")]
        collector = "\ngc by executor" if d.get("garbage_collection") == "while_device_busy" else ""
        # the key came with hold_spread (40e5a2d): a run without it did not hold spread robots one frame
        # at a time (with two frames in flight the server held them anyway)
        held = (
            "\nspread held"
            if kind == "spread" and d.get("hold_spread") and d["pipelining"] == "latency"
            else ""
        )
        label = f"{d['commit']}\n{kind}{profiles}{frozen}{collector}{held}\n{where}"
        found.append((label, d["confirm"]))
    return found


def main(results: list[Path], out: Path) -> None:
    rows = [row for path in results for row in confirmations(json.loads(path.read_text()))]
    if not rows:
        raise SystemExit("results: no 60 s confirmation in them")
    labels = [label for label, _ in rows]
    fig, (miss_ax, p99_ax) = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(rows)), 7), sharex=True)
    xs = range(len(rows))
    misses = [c["misses"] for _, c in rows]
    # four processes on one host at once: another colour, not to be compared with the two-GPU runs
    colors = [
        "tab:gray" if label.endswith("*") else "tab:green" if label.endswith("one GPU") else "tab:blue"
        for label in labels
    ]
    miss_ax.bar(xs, [max(m, 0.8) for m in misses], color=colors)
    miss_ax.legend(
        handles=[
            Patch(color="tab:blue", label="two GPUs, a server each"),
            Patch(color="tab:green", label="one GPU alone"),
            Patch(color="tab:gray", label="* four processes on one host"),
        ],
        fontsize=8,
        loc="upper right",
    )
    miss_ax.set_yscale("log")
    for x, (_, c) in zip(xs, rows, strict=True):
        pause = c.get("gc_pauses", {}).get("2", {}).get("max_ms")
        note = f"{c['misses']}" + (f"\ngc {pause:.0f} ms" if pause is not None else "")
        miss_ax.annotate(note, (x, max(c["misses"], 0.8)), ha="center", va="bottom", fontsize=7)
    chunks = rows[0][1]["chunks_per_s"] * rows[0][1]["seconds"]
    miss_ax.set_ylabel(f"late or dropped, of about {chunks:.0f} chunks")
    miss_ax.set_ylim(0.5, max(misses) * 8)
    p99_ax.bar(xs, [c["worst_p99_ms"] for _, c in rows], color=colors)
    p99_ax.axhline(50, color="red", lw=1, ls="--", label="deadline, 50 ms")
    p99_ax.set_ylabel("worst robot's p99, ms")
    p99_ax.legend(fontsize=8, loc="lower right")
    p99_ax.set_xticks(list(xs), labels, fontsize=7)
    robots = rows[0][1]["robots"]
    fig.suptitle(
        f"{robots} LIBERO-shaped robots per H200, 20 Hz, 60 s after a 10 s run without a miss "
        "(gc: the longest full collection; *: four processes on one host at once)",
        fontsize=10,
    )
    save_figure(fig, out)


if __name__ == "__main__":
    figure_from_results(main, __doc__, "docs/img/fleet_confirmations.png")
