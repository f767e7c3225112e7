"""FP8 activation scales: calibrated on observations (recorded, or synthetic when none are given), saved
with what they were made for, and refused when loaded for anything else.

A scales file (safetensors) holds one `input_scale` per FP8 GEMM and, as metadata, the weights it was
made for (the checkpoint file's fingerprint, so a renamed or copied checkpoint keeps its scales; or the
random seed), the model's shape, whether the
expert is included, the denoising steps, the margin, the frames used and held out, and the fraction of
held-out GEMM inputs the scales clamp. The last frames of the recording (a quarter, at least one when
there are two or more) are held out: scales made on the rest are checked on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..graphs.config import ModelConfig
from ..graphs.fp8 import (
    EXPERT_ROW_PADDING,
    FP8Linear,
    calibrate,
    clamped_fraction,
    fp8_modules,
    load_calibration,
    quantize_prefix,
    quantize_stack,
    save_calibration,
)
from ..graphs.pi0 import time_schedule
from .inputs import pixels_to_model_input
from .loading import PolicyParts
from .types import Observation

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "vla_runtime.fp8_calibration/1"
HOLDOUT_FRACTION = 0.25
# What a scales file must match to be loaded; the rest of its metadata is informative.
IDENTITY_KEYS = ("format", "weights", "model_shape", "fp8_expert")


def model_shape_digest(cfg: ModelConfig) -> str:
    """Every shape the activations depend on (not the name, default steps or how many actions are offered)."""
    shape = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("name", "default_steps", "n_action_steps")
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attach_fp8(parts: PolicyParts, fp8_expert: bool) -> dict[str, FP8Linear]:
    """Quantise the prefix's GEMM weights once (and the action expert's), switch them to FP8, and return
    every FP8 GEMM by name (the scales file's keys)."""
    model = parts.model
    quantize_prefix(model.prefix_lm)
    model.prefix_lm.set_quantized(True)
    modules = fp8_modules(model.prefix_lm)
    if fp8_expert:
        quantize_stack(model.expert, row_padding=EXPERT_ROW_PADDING)
        model.expert.set_quantized(True)
        modules.update(fp8_modules(model.expert, prefix="expert."))
    return modules


def identity(parts: PolicyParts, fp8_expert: bool) -> dict[str, str]:
    return {
        "format": CALIBRATION_FORMAT,
        "weights": parts.weights_id,
        "model_shape": model_shape_digest(parts.config.model),
        "fp8_expert": str(bool(fp8_expert)).lower(),
    }


def frames_runner(parts: PolicyParts, observations: list[Observation], fp8_expert: bool, seed: int):
    """A function that runs the stages over the observations (the expert over every denoising step)."""
    config, model, device = parts.config, parts.model, parts.device
    frames = [parts.preparer(obs) for obs in observations]
    times, dt = time_schedule(config.denoising_steps)
    times = torch.from_numpy(times).to(device)
    cfg = config.model

    @torch.inference_mode()
    def run():
        generator = torch.Generator().manual_seed(seed)
        for f in frames:
            t = lambda a: torch.from_numpy(a)[None].to(device)  # noqa: E731
            tokens = model.encode_images(pixels_to_model_input(f.pixels_on(device)[None]))
            kv, mask = model.fill_prefix(tokens, t(f.image_masks), t(f.tokens), t(f.token_masks))
            if fp8_expert:
                noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=generator).to(device)
                model.denoise(kv, mask, t(f.state), noise, times, dt)

    return run


def calibrate_scales(
    parts: PolicyParts,
    modules: dict[str, FP8Linear],
    observations: list[Observation],
    source: str,
    fp8_expert: bool,
    margin: float,
    seed: int = 0,
) -> dict[str, str]:
    """Fix every FP8 GEMM's input scale from `observations` (the last quarter held out to measure the
    clamped fraction); returns the metadata to save with them."""
    if not observations:
        raise ValueError("observations: none to calibrate on")
    holdout = int(len(observations) * HOLDOUT_FRACTION) if len(observations) >= 2 else 0
    holdout = max(holdout, 1) if len(observations) >= 2 else 0
    fit, check = observations[: len(observations) - holdout], observations[len(observations) - holdout :]
    calibrate(modules, frames_runner(parts, fit, fp8_expert, seed), margin)
    clamped = clamped_fraction(modules, frames_runner(parts, check, fp8_expert, seed + 1)) if check else None
    return {
        **identity(parts, fp8_expert),
        "model_id": parts.model_id,
        "steps": str(parts.config.denoising_steps),
        "margin": f"{margin:g}",
        "frames": str(len(fit)),
        "holdout_frames": str(len(check)),
        "clamped_fraction_holdout": "n/a" if clamped is None else f"{clamped:.3e}",
        "source": source,
        "calibrated_on": f"{parts.device.type} {str(parts.model.compute_dtype).removeprefix('torch.')}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - not a safetensors file
        raise ValueError(f"fp8_calibration: cannot read {path}: {err}") from None


def load_scales(
    parts: PolicyParts, modules: dict[str, FP8Linear], path: str | Path, fp8_expert: bool
) -> dict:
    """Load scales made for exactly this model; a file made for other weights, another shape or another
    set of FP8 GEMMs is refused, naming what differs."""
    meta = read_metadata(path)
    expected = identity(parts, fp8_expert)
    wrong = [
        f"{k}: file {meta.get(k, '(none)')!r}, this model {expected[k]!r}"
        for k in IDENTITY_KEYS
        if meta.get(k) != expected[k]
    ]
    if wrong:
        raise ValueError(
            f"fp8_calibration: {path} was not made for this model ({'; '.join(wrong)}); "
            "make one with `vla-runtime calibrate`"
        )
    load_calibration(modules, path)
    return meta


def save_scales(modules: dict[str, FP8Linear], path: str | Path, metadata: dict[str, str]) -> Path:
    path = Path(path)
    check_writable_file(path, "fp8_calibration")
    try:
        return save_calibration(modules, path, metadata)
    except Exception as err:  # noqa: BLE001 - safetensors' own error is no OSError
        raise ValueError(f"fp8_calibration: cannot write {path}: {err}") from None


def check_writable_file(path: Path, field: str) -> None:
    """A file that can be written (its folder made if need be): not a folder or a device, which
    safetensors would replace; ValueError naming `field`, before minutes of calibration."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{field}: {path} is not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{field}: cannot write {path}: {err.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{field}: cannot write {path}: its folder is not writable")


def synthetic_observations(parts: PolicyParts, frames: int, seed: int) -> list[Observation]:
    from .synthetic import synthetic_observation

    rng = np.random.default_rng(seed)
    return [synthetic_observation(parts.config, rng) for _ in range(frames)]
