"""Parallel LIBERO evaluation: the same episodes with 1 and with N workers (`eval-libero --workers`), in
one run; episodes per hour and the speed-up.

python benchmarks/libero_parallel.py OUT.json [--workers 2] [--tasks 0,1] [--trials 2] [--max-steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_doc import run_header  # noqa: E402

CLI = str(Path(sys.executable).parent / "vla-runtime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", default="0,1")
    parser.add_argument("--trials", default="2")
    parser.add_argument("--max-steps", default="40")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    doc = {
        **run_header(),
        "cpus": os.cpu_count(),
        "policy_device": args.device,
        "episodes": f"libero_spatial tasks {args.tasks} x {args.trials} trials, {args.max_steps} steps",
        "runs": {},
    }
    for workers in (1, args.workers):
        with tempfile.TemporaryDirectory() as out:
            command = [CLI, "eval-libero", "--tasks", args.tasks, "--trials", args.trials]
            command += ["--max-steps", args.max_steps, "--device", args.device, "--workers", str(workers)]
            command += ["--out", out, "--json"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
        doc["runs"][str(workers)] = {
            k: summary[k] for k in ("episodes", "wall_s", "episodes_per_hour", "chunks", "chunk_age_ms")
        }
        print(workers, doc["runs"][str(workers)], flush=True)
    one, many = doc["runs"]["1"], doc["runs"][str(args.workers)]
    doc["speedup"] = round(many["episodes_per_hour"] / one["episodes_per_hour"], 2)
    args.out.write_text(json.dumps(doc, indent=1))
    print("speed-up", doc["speedup"])


if __name__ == "__main__":
    main()
