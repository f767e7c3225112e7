"""LIBERO episodes per hand-over mode, through `vla-runtime eval-libero` (in-process), in one run:
lockstep with an injected delay, and wall clock (the delay is the policy's own). Each episode's report
has the action jump at every hand-over beside the step between actions of one chunk.

python benchmarks/libero_handover.py OUT.json [--preset pi05_tiny] [--device cpu] [--max-steps 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from results_doc import run_header  # noqa: E402

MODES = ("switch", "blend", "inpaint", "rtc")
RUNS = (("lockstep", ["--mode", "lockstep", "--delay-steps", "2"]), ("wall_clock", ["--mode", "wall_clock"]))
CLI = str(Path(sys.executable).parent / "vla-runtime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05_tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-steps", default="40")
    args = parser.parse_args()
    doc = {
        **run_header(),
        "policy_device": args.device,
        "preset": args.preset,
        "suite": "libero_spatial task 0, init 0",
        "runs": [],
    }
    for run_name, run_args in RUNS:
        for mode in MODES:
            with tempfile.TemporaryDirectory() as out:
                command = [CLI, "eval-libero", "--tasks", "0", "--max-steps", args.max_steps]
                command += ["--settle-steps", "2", "--preset", args.preset, "--device", args.device]
                command += ["--handover", mode, "--out", out, "--json", *run_args]
                done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
                summary = json.loads(done.stdout.strip().splitlines()[-1])
            row = {
                "run": run_name,
                "handover": mode,
                "delay_steps": summary["delay_steps"],
                "chunks": summary["chunks"],
                "splice_jumps": summary["splice_jumps"],
                "step_sizes": summary["step_sizes"],
                "chunk_age_ms": summary["chunk_age_ms"],
                "deadline_misses": summary["deadline_misses"],
            }
            print(json.dumps(row), flush=True)
            doc["runs"].append(row)
            args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
