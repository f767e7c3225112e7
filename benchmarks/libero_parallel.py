"""Parallel LIBERO evaluation: the same episodes with 1 worker and with more (`eval-libero --workers`), in
one run; episodes per hour and the speed-up against the one worker.

Each count is one `vla-runtime eval-libero` process; episodes per hour count the episodes' wall time alone,
and `start_s` is the rest of the process's time (start-up with its compile, shut-down, the report).
Counts run in the order given; a compile cache (`--model-args "... --compile-cache DIR"`) shared by them
spares the later ones the shapes the earlier ones compiled.

python benchmarks/libero_parallel.py OUT.json [--workers 1,2] [--tasks 0,1] [--trials 2] [--max-steps 40]
    [--device cpu] [--model-args "--preset pi05 ..."] [--libero-versions "mujoco 3.2.7, ..."]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_doc import run_header  # noqa: E402
from vla_runtime.sim.launcher import usable_cpus

CLI = str(Path(sys.executable).parent / "vla-runtime")
KEPT = ("episodes", "wall_s", "episodes_per_hour", "chunks", "chunk_age_ms", "success_rate", "time")


def run_workers(args, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [CLI, "eval-libero", "--tasks", args.tasks, "--trials", args.trials]
        command += ["--max-steps", args.max_steps, "--device", args.device, "--workers", str(workers)]
        command += [*shlex.split(args.model_args), "--out", out, "--json"]
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        process_s = time.monotonic() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    row = {k: summary[k] for k in KEPT if k in summary}
    row["start_s"] = round(process_s - summary["wall_s"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", default="1,2", help="worker counts, run in this order (1 is added)")
    parser.add_argument(
        "--no-baseline", action="store_true", help="do not add the one-worker run (no speed-up then)"
    )
    parser.add_argument("--tasks", default="0,1")
    parser.add_argument("--trials", default="2")
    parser.add_argument("--max-steps", default="40")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-args", default="", help="passed on to eval-libero (preset, precision, ...)")
    parser.add_argument("--libero-versions", default="", help="recorded: the simulator stack's versions")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    counts += [] if 1 in counts or args.no_baseline else [1]
    doc = {
        **run_header(),
        "cpus": usable_cpus(),
        "policy_device": args.device,
        "model_args": args.model_args,
        "libero_versions": args.libero_versions,
        "episodes": f"libero_spatial tasks {args.tasks} x {args.trials} trials, {args.max_steps} steps "
        "(after eval-libero's default 10 settle steps)",
        "runs": {},
    }
    for workers in counts:
        doc["runs"][str(workers)] = run_workers(args, workers)
        print(workers, doc["runs"][str(workers)], flush=True)
        args.out.write_text(json.dumps(doc, indent=1))  # what ran so far survives a later failure
    if "1" in doc["runs"]:
        one = doc["runs"]["1"]["episodes_per_hour"]
        doc["speedup"] = {w: round(run["episodes_per_hour"] / one, 2) for w, run in doc["runs"].items()}
        args.out.write_text(json.dumps(doc, indent=1))
        print("speed-up", doc["speedup"])


if __name__ == "__main__":
    main()
