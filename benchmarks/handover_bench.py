"""Chunk hand-over modes measured in one run (issue 14): per precision and mode, the stage times with a
previous chunk given, the splice continuity of a chain of chunks at several delays, and the guided loop
in graphs against the eager reference.

Splice chain: one scene whose state drifts slightly (a robot at 20 Hz sees little change between
frames); each chunk executes EXECUTED actions, then the next observation is taken and `delay` more
actions of the old chunk run before the new one takes over (runtime/handover.splice_metrics). switch
ignores the previous chunk: its jump is the baseline at the same delay.

python benchmarks/handover_bench.py OUT_DIR [--preset pi05]   (CUDA machine; --preset pi05_tiny on a CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: its tests package
from results_doc import run_header  # noqa: E402
from vla_runtime.runtime.config import GPU_PRECISION_OPTIONS, RuntimeConfig  # noqa: E402
from vla_runtime.runtime.executor import PipelinedExecutor  # noqa: E402
from vla_runtime.runtime.handover import PreviousChunk, splice_metrics  # noqa: E402
from vla_runtime.runtime.loading import build_parts  # noqa: E402
from vla_runtime.runtime.reference import EagerPolicy  # noqa: E402
from vla_runtime.runtime.types import Observation  # noqa: E402

from tests.conftest import random_observation  # noqa: E402

PRECISIONS = {k: GPU_PRECISION_OPTIONS[k] for k in ("bf16", "fp8", "fp8_all")}
# name -> hand-over settings; blend is switch on the device, a cross-fade on the host. rtc-vjpK takes the
# exact vector-Jacobian product on the first K steps (a backward pass through the expert each), the
# identity Jacobian on the rest; rtc-vjp10 is the exact product at every step.
VARIANTS = {
    "switch": dict(handover="switch"),
    "inpaint": dict(handover="inpaint"),
    **{f"rtc-vjp{k}": dict(handover="rtc", rtc_vjp_steps=k) for k in (0, 1, 2, 3, 10)},
}
DELAYS = (0, 2, 4)
EXECUTED = 5  # actions executed from each chunk before the next observation
CHAIN = 12  # chunks per splice chain
LATENCY_FRAMES, WARMUP = 60, 5
PLOT_CHUNKS = 6


def scene(rng, preset: str, frames: int) -> list[Observation]:
    """One scene, its state drifting by 1% per frame."""
    base = random_observation(rng, preset, side=224)
    out = []
    for i in range(frames):
        state = (base.state + 0.01 * i * np.ones_like(base.state)).astype(np.float32)
        out.append(Observation(base.images, state, base.instruction, float(i) * 0.05))
    return out


def with_settings(parts, settings: dict):
    return type(parts)(**{**vars(parts), "config": parts.config.replace(**settings)})


def splice_chain(policy, observations, noises, delay: int) -> tuple[list[dict], list[np.ndarray]]:
    chunks = [policy.infer(observations[0], noises[0]).actions]
    metrics = []
    for k in range(1, len(observations)):
        previous = PreviousChunk(chunks[-1][EXECUTED:], delay)
        chunks.append(policy.infer(observations[k], noises[k], previous).actions)
        metrics.append(splice_metrics(chunks[-2], EXECUTED, chunks[-1], delay))
    return metrics, chunks


def mean_of(metrics: list[dict], key: str) -> float:
    return float(np.nanmean([m[key] for m in metrics]))


def main(out: Path, preset: str, only: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = PRECISIONS if device == "cuda" else {"float32": dict(precision="float32")}
    precisions = {k: v for k, v in precisions.items() if only is None or k in only}
    doc = {
        **run_header(),
        "preset": preset,
        "executed": EXECUTED,
        "rows": [],
        "chunks_for_plot": {},
    }
    for precision, settings in precisions.items():
        parts = build_parts(RuntimeConfig(preset=preset, device=device, **settings))
        cfg = parts.config.model
        rng = np.random.default_rng(0)
        observations = scene(rng, preset, CHAIN)
        noises = [
            rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32) for _ in observations
        ]
        for mode, handover in VARIANTS.items():
            if parts.config.fp8_expert and handover.get("rtc_vjp_steps", 0) > 0:
                continue  # the FP8 expert GEMMs have no backward
            mode_parts = with_settings(parts, handover)
            start = time.monotonic()
            with PipelinedExecutor(parts=mode_parts) as executor:
                ready_s = time.monotonic() - start
                previous = PreviousChunk(executor.infer(observations[0], noises[0]).actions[EXECUTED:], 2)
                stage_ms: dict[str, list[float]] = {}
                for i in range(WARMUP + LATENCY_FRAMES):
                    chunk = executor.infer(observations[i % CHAIN], noises[i % CHAIN], previous)
                    if i >= WARMUP:
                        for key in ("vision", "prefix", "denoise", "total"):
                            stage_ms.setdefault(key, []).append(chunk.timings_ms[key])
                row = {
                    "precision": precision,
                    "mode": mode,
                    "ready_s": round(ready_s, 1),
                    "stages_ms_p50": {k: float(np.median(v)) for k, v in stage_ms.items()},
                    "total_ms_p99": float(np.percentile(stage_ms["total"], 99)),
                    "splice": {},
                }
                for delay in DELAYS:
                    metrics, chunks = splice_chain(executor, observations, noises, delay)
                    row["splice"][str(delay)] = {
                        key: mean_of(metrics, key) for key in ("jump", "step", "deviation", "disagreement")
                    }
                    if delay == 2 and precision == next(iter(precisions)):
                        doc["chunks_for_plot"][mode] = [c[:, 0].tolist() for c in chunks[:PLOT_CHUNKS]]
                if mode != "switch":  # the captured guided loop against the eager one, same weights
                    reference = EagerPolicy(parts=mode_parts)
                    worst = 0.0
                    for k in range(1, 3):
                        previous_k = PreviousChunk(
                            executor.infer(observations[k - 1], noises[k - 1]).actions[EXECUTED:], 2
                        )
                        got = executor.infer(observations[k], noises[k], previous_k).actions
                        want = reference.infer(observations[k], noises[k], previous_k).actions
                        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
                    row["graphs_vs_eager_rel"] = worst
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
            (out / "handover.json").write_text(json.dumps(doc, indent=1))  # partial results survive a timeout
            del mode_parts
            torch.cuda.empty_cache() if device == "cuda" else None
        del parts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--precisions", help=f"comma-separated, of {', '.join(PRECISIONS)} (default all)")
    args = parser.parse_args()
    main(args.out, args.preset, args.precisions.split(",") if args.precisions else None)
