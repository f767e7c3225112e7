"""Parallel LIBERO's figure for docs/many_robots.md: the speed-up in episodes per hour against workers, each
run against its own one-worker baseline (runs on different machines are not compared), beside the linear
speed-up; and the chunks' age (p50, p99) per worker count.

python benchmarks/plot_libero_parallel.py RUN.json [RUN.json ...] [--out docs/img/libero_parallel.png]
    [--what COMMIT=TEXT ...]   (what a run's code changed, for its label)
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(paths: list[Path], out: Path, what: dict[str, str]) -> None:
    docs = [json.loads(path.read_text()) for path in paths]
    first = docs[0]
    for doc in docs[1:]:  # one figure, one workload and one kind of machine
        for key in ("episodes", "cpus", "device"):
            if doc[key] != first[key]:
                raise SystemExit(f"{key}: {doc[key]!r} in one file, {first[key]!r} in another")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    top = 1
    every_count = {int(w) for doc in docs for w in doc["runs"]}
    for k, doc in enumerate(docs):
        workers = sorted(int(w) for w in doc["runs"])
        # a run that skipped counts others ran: dotted, so its line between two counts reads as no data
        gap = ":" if set(workers) != every_count else None
        runs = [doc["runs"][str(w)] for w in workers]
        color = f"C{k}"
        setting = doc["libero_versions"].split("; ")[1:]  # what the run set beside the versions, if anything
        label = ", ".join([f"commit {doc['commit']}", *setting, *filter(None, [what.get(doc["commit"])])])
        for quantile, style in (("p50", "o" + (gap or "-")), ("p99", "s" + (gap or "--"))):
            ages = [r["chunk_age_ms"][quantile] for r in runs]
            right.plot(workers, ages, style, color=color, label=f"{label} {quantile}")
        if "1" not in doc["runs"]:  # no baseline in that run: no speed-up to draw
            continue
        one = doc["runs"]["1"]["episodes_per_hour"]
        speedups = [r["episodes_per_hour"] / one for r in runs]
        top = max(top, *workers)
        left.plot(
            workers,
            speedups,
            "o" + (gap or "-"),
            color=color,
            label=f"{label} (1 worker: {one:.0f} episodes/h)",
        )
        for w, x in zip(workers, speedups, strict=True):
            if w == 1:
                continue  # 1.00x by definition
            offset = [(4, -14), (-44, 4), (-20, 8), (6, 0)][k % 4]  # the runs' labels at one count apart
            left.annotate(
                f"{x:.2f}x", (w, x), fontsize=8, color=color, xytext=offset, textcoords="offset points"
            )
    left.plot([1, top], [1, top], ":", color="gray", label="linear")
    left.set_xlabel("workers (LIBERO simulators, one batched policy server)")
    left.set_ylabel("speed-up: episodes per hour / one worker's, same run")
    left.legend(fontsize=7, loc="lower right")
    left.set_title(textwrap.fill(f"{first['episodes']}; {first['cpus']} CPUs", 80), fontsize=9)
    right.set_xlabel("workers")
    right.set_ylabel("chunk age, ms (observation to chunk, lockstep)")
    right.legend(fontsize=7, loc="upper left")
    right.set_title("the policy's answer, per worker count")
    versions = first["libero_versions"].split("; ")[0]
    fig.suptitle(f"{first['device']}, pi05 (LIBERO-shaped) on the GPU; LIBERO: {versions}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("docs/img/libero_parallel.png"))
    parser.add_argument("--what", action="append", default=[], metavar="COMMIT=TEXT")
    args = parser.parse_args()
    if any("=" not in item for item in args.what):
        parser.error("--what: COMMIT=TEXT")
    main(args.runs, args.out, dict(item.split("=", 1) for item in args.what))
