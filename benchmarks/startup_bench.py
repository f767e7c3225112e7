"""Start-up of a pi05 executor, cold and warm (issue 16, item 3): each start is a fresh process against
one compile cache directory, first empty (cold), then as the first left it (warm). Timed from the
process's spawn to its first chunk, with the time to import, to build and capture, and the first frame;
then the median latency of FRAMES more, so each compile scope's cost in speed is in the same run; then
how far the actions are from the eager reference's on fresh inputs (the compiled functions this start
compiled or loaded from an earlier one, `precompiled`).

python benchmarks/startup_bench.py OUT.json [--mode fp8_all] [--starts 2] [--scopes stage,layer]
    [--bytecode-cache] [--traced]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_doc import run_header, save

CHILD = r"""
import json, sys, time
start = time.monotonic()
def say(event, **fields):
    print(json.dumps({"event": event, "s": time.monotonic() - start, **fields}), flush=True)
import numpy as np
import torch
from vla_runtime.runtime.config import GPU_PRECISION_OPTIONS, RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.synthetic import synthetic_observation
say("imported")
options = GPU_PRECISION_OPTIONS[sys.argv[1]]
config = RuntimeConfig(
    preset="pi05",
    device="cuda",
    compile_cache=sys.argv[2],
    compile_scope=sys.argv[3],
    precompile=sys.argv[4] == "precompiled",  # child_arguments' last
    **options,
)
with PipelinedExecutor(config) as executor:
    say("ready", cache=executor.compile_cache.describe(), phases_s=executor.startup_s)
    observation = synthetic_observation(config, np.random.default_rng(0))
    chunk = executor.infer(observation)
    say("first_chunk", total_ms=chunk.timings_ms["total"])
    totals = [executor.infer(observation).timings_ms["total"] for _ in range(FRAMES)]
    say("served", frames=FRAMES, total_p50_ms=float(np.median(totals[10:])))
    # After the timing: the functions this start compiled or loaded give the eager reference's actions.
    from vla_runtime.runtime.reference import EagerPolicy
    reference, rng = EagerPolicy(parts=executor.parts), np.random.default_rng()
    diffs = []
    for _ in range(3):
        observation = synthetic_observation(config, rng)
        noise = rng.standard_normal((config.model.action_horizon, config.model.action_dim), dtype=np.float32)
        want = reference.infer(observation, noise).actions
        got = executor.infer(observation, noise).actions
        diffs.append(float(np.abs(got - want).max() / np.abs(want).max()))
    say("checked", max_rel_diff_vs_eager=max(diffs), precompiled=executor.report()["precompiled"])
""".replace("FRAMES", "60")


def child_environment(pycache: str | None) -> dict:
    """The child's environment: as it is, or with Python's bytecode kept under `pycache` (as a robot's
    pip install leaves it: a venv that cannot be written, as on the GPU machine here, otherwise compiles
    every imported module's source at every start)."""
    env = dict(os.environ)
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def child_arguments(mode: str, cache_dir: str, scope: str, precompile: bool = True) -> list[str]:
    """The child's command-line arguments (CHILD reads them in this order)."""
    return [mode, cache_dir, scope, "precompiled" if precompile else "traced"]


def one_start(
    mode: str, cache_dir: str, scope: str, pycache: str | None = None, precompile: bool = True
) -> dict:
    """One fresh process: the parent's clock from spawn to the line announcing the first chunk (the
    child's own clock starts after Python's start-up), and to the process's exit."""
    spawned = time.monotonic()
    errors = tempfile.TemporaryFile("w+")  # not a pipe: a child's many warnings must not block it
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *child_arguments(mode, cache_dir, scope, precompile)],
        env=child_environment(pycache),
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    events, first_chunk_s = {}, None
    for line in proc.stdout:
        if line.startswith("{"):
            event = json.loads(line)
            events[event.pop("event")] = event
            if "first_chunk" in events and first_chunk_s is None:
                first_chunk_s = time.monotonic() - spawned
    proc.wait()
    errors.seek(0)
    stderr = errors.read()
    errors.close()
    if proc.returncode or first_chunk_s is None:
        raise RuntimeError(f"start-up run failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    return {
        "precompile": precompile,
        "bytecode_cached": pycache is not None,
        "spawn_to_first_chunk_s": first_chunk_s,
        "spawn_to_exit_s": time.monotonic() - spawned,
        "events": events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", default="fp8_all")
    parser.add_argument("--starts", type=int, default=2, help="the first is cold, the rest warm")
    parser.add_argument("--scopes", default="stage", help="compile scopes, each its own cache: stage,layer")
    parser.add_argument(
        "--bytecode-cache",
        action="store_true",
        help="keep Python's bytecode between starts (one directory for the run; the first start fills it), "
        "then one more warm start per scope with the environment as it is",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="per scope, as many starts again with precompile off (torch.compile traces; their own cache "
        "directory, so the first is cold): the baseline",
    )
    args = parser.parse_args()
    doc = {
        **run_header(),
        "mode": args.mode,
        "starts": [],
    }
    pycache = tempfile.mkdtemp(prefix="vla-pycache-") if args.bytecode_cache else None
    for scope in args.scopes.split(","):
        with tempfile.TemporaryDirectory(prefix="vla-compile-") as cache_dir:
            starts = [(pycache, True)] * args.starts + ([(None, True)] if pycache else [])
            # precompile is in the compile cache's key: the traced starts get a directory of their own in it
            starts += [(pycache, False)] * args.starts if args.traced else []
            for pycache_dir, precompile in starts:
                run = {
                    "compile_scope": scope,
                    **one_start(args.mode, cache_dir, scope, pycache_dir, precompile),
                }
                doc["starts"].append(run)
                print(json.dumps(run), flush=True)
                save(doc, args.out)


if __name__ == "__main__":
    main()
