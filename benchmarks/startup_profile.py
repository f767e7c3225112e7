"""Where a warm start's time goes (issue 16, item 3): per compile scope, a cold start fills a cache; then a
warm start, and one under cProfile, whose statistics are written as text (by cumulative and by own time).
The start is startup_bench's child process. (The run recorded at d855152 also compared a warm start with
Inductor's compile workers and one without; a warm cache now always starts without them.)

python benchmarks/startup_profile.py OUT_DIR [--scopes stage,layer] [--mode fp8_all]
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from startup_bench import CHILD, child_arguments


def timed(command: list[str], env: dict | None = None) -> tuple[float, list[str]]:
    """Seconds from spawn to exit, and the child's event lines."""
    started = time.monotonic()
    done = subprocess.run(
        command, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=True
    )
    return time.monotonic() - started, [line for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scopes", default="stage,layer")
    parser.add_argument("--mode", default="fp8_all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    child = args.out / "child.py"
    child.write_text(CHILD)
    for scope in args.scopes.split(","):
        cache = tempfile.mkdtemp(prefix="vla-profile-")
        command = [sys.executable, str(child), *child_arguments(args.mode, cache, scope)]
        for label in ("cold", "warm"):
            seconds, events = timed(command)
            print(f"{scope} {label}: {seconds:.1f} s", *events, sep="\n  ", flush=True)
        profile = args.out / f"warm-{scope}.prof"
        timed([sys.executable, "-m", "cProfile", "-o", str(profile), *command[1:]])
        with (args.out / f"warm-{scope}.txt").open("w") as text:
            stats = pstats.Stats(str(profile), stream=text)
            stats.sort_stats("cumulative").print_stats(120)
            stats.sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
