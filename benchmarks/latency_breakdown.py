"""Where a chunk's end-to-end time goes beyond the three stages: queue wait, the host-to-device copy,
the device span from the first copy to the last, and the host time around it (issue, completion).

--shape-profiles: one executor with shape profiles serves two workloads in turns, in one run (issue 16):
LIBERO-shaped frames (two cameras, a short instruction: a small profile) and full-shaped ones (every
camera, an instruction that fills the 200-token prompt). The model is one for both: --libero-model takes
openpi's pi05_libero settings (a horizon of 10 actions, not pi05's 50; the state not in the prompt), so
LIBERO's own shape is the LIBERO-shaped frames of a run with --libero-model.

    python3 benchmarks/latency_breakdown.py [--precision fp8 --fp8-expert] [--shape-profiles]
        [--libero-model] [--image-side 480 --resize-on-device yes] --out $OUT/breakdown.json

--compare-resize: two executors in one process, the host's resize and the device's (`resize_on_device`),
served the same frames in turns of 20, so the two are measured in one run (use with --image-side 256,
LIBERO's render, or a camera's 480).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from unittest import mock

import numpy as np
from results_doc import run_header
from vla_runtime.graphs.checkpoint import KNOWN_OPENPI_CONFIGS
from vla_runtime.runtime import calibration
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.settings import RESIZE_ON_DEVICE
from vla_runtime.runtime.synthetic import synthetic_observation
from vla_runtime.runtime.types import Observation

TURN = 20  # frames of one workload before the other's turn


def longest_instruction(executor: PipelinedExecutor, obs: Observation) -> str:
    """The longest instruction of repeated words that fits the prompt (200 tokens for pi05, the state
    included; sized for the widest state, so one search serves every observation)."""
    words = "then carefully put the black bowl on the plate".split()

    def fits(n: int) -> bool:
        instruction = " ".join(words[k % len(words)] for k in range(n))
        try:
            executor.prepare(Observation(obs.images, obs.state, instruction, obs.timestamp))
        except ValueError:
            return False
        return True

    low, high = 1, 512  # fits(low); not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return " ".join(words[k % len(words)] for k in range(low))


def full_shaped(executor: PipelinedExecutor, rng: np.random.Generator, side: int, instruction: str):
    """Every camera (the optional one too) and `instruction`."""
    config = executor.config
    obs = synthetic_observation(config, rng, side)
    images = {
        name: rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for name in config.model.camera_names
    }
    return Observation(images, obs.state, instruction, obs.timestamp)


def medians_of(rows: list[dict]) -> dict:
    medians = {k: float(np.median([r[k] for r in rows])) for k in sorted(rows[0])}
    medians["stages_sum"] = medians["vision"] + medians["prefix"] + medians["denoise"]
    if "device_total" in medians:  # CUDA only
        medians["host_outside_device"] = medians["total"] - medians["device_total"]  # prepare included
    return medians


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--fp8-expert", action="store_true")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument(
        "--image-side",
        type=int,
        default=224,
        help="camera frames of this side (224: no resize; LIBERO renders 256)",
    )
    ap.add_argument(
        "--resize-on-device", choices=list(RESIZE_ON_DEVICE), default="auto", help="the runtime's setting"
    )
    ap.add_argument(
        "--compare-resize", action="store_true", help="host resize against device resize, in turns"
    )
    ap.add_argument(
        "--compare-row-padding",
        action="store_true",
        help="the expert FP8 GEMMs without their row padding (fp8.EXPERT_ROW_PADDING) and with, in turns",
    )
    ap.add_argument("--shape-profiles", action="store_true", help="LIBERO-shaped and full-shaped, in turns")
    ap.add_argument(
        "--libero-model",
        action="store_true",
        help="the model as openpi's pi05_libero has it (horizon 10, no state in the prompt); else pi05's",
    )
    ap.add_argument("--out", default="breakdown.json")
    args = ap.parse_args()
    config = RuntimeConfig(
        preset="pi05",
        device="cuda",
        precision=args.precision,
        fp8_expert=args.fp8_expert,
        # --compare-resize: the first executor resizes on the host
        resize_on_device=False if args.compare_resize else RESIZE_ON_DEVICE[args.resize_on_device],
        shape_profiles=args.shape_profiles,
        **(KNOWN_OPENPI_CONFIGS["pi05_libero"] if args.libero_model else {}),
    )
    rng = np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        if args.compare_row_padding:  # the first executor's expert built without the padding
            with mock.patch.object(calibration, "EXPERT_ROW_PADDING", {}):
                executor = stack.enter_context(PipelinedExecutor(config))
        else:
            executor = stack.enter_context(PipelinedExecutor(config))
        observations = [synthetic_observation(config, rng, args.image_side) for _ in range(8)]
        workloads = {"default": (executor, observations)}  # name -> (executor, frames)
        if args.shape_profiles:
            longest = longest_instruction(executor, full_shaped(executor, rng, args.image_side, "go"))
            full = [full_shaped(executor, rng, args.image_side, longest) for _ in range(8)]
            workloads = {"libero": (executor, observations), "full": (executor, full)}
        if args.compare_row_padding:
            padded = stack.enter_context(PipelinedExecutor(config))
            workloads = {"unpadded_rows": (executor, observations), "padded_rows": (padded, observations)}
        if args.compare_resize:
            on_device = stack.enter_context(PipelinedExecutor(config.replace(resize_on_device=True)))
            workloads = {"host_resize": (executor, observations), "device_resize": (on_device, observations)}
        rows = {name: [] for name in workloads}
        for served, frames in workloads.values():  # each workload's shapes captured before the clock
            for obs in frames[:3]:
                served.infer(obs)
        for i in range(args.frames * len(workloads)):
            name = list(workloads)[(i // min(TURN, args.frames)) % len(workloads)]
            served, frames = workloads[name]
            start = time.perf_counter()
            chunk = served.infer(frames[i % 8])
            wall = (time.perf_counter() - start) * 1e3
            rows[name].append({**chunk.timings_ms, "caller_wall": wall})
        served_by = {  # each workload's executor as it was (with --compare-resize, two)
            name: {
                "resizes_on_device": served.config.resizes_on_device,
                "captures": served.health()["counters"].get("captures"),
                "profiles": served.report()["profiles"],  # the shapes the workloads ran in
            }
            for name, (served, _) in workloads.items()
        }
    result = {
        **run_header(),
        "config": vars(args),
        "median_ms": {name: medians_of(r) for name, r in rows.items()},
        "model": {
            "action_horizon": config.model.action_horizon,
            "state_in_prompt": config.model.state_in_prompt,
        },
        "frames_per_workload": args.frames,
        "executors": served_by,
    }
    if list(rows) == ["default"]:
        result["median_ms"] = result["median_ms"]["default"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, r in rows.items():
        for k, v in medians_of(r).items():
            print(f"{name:8s} {k:40s} {v:8.3f} ms")


if __name__ == "__main__":
    main()
