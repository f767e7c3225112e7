"""Assemble what every policy implementation needs from a RuntimeConfig: the model on its device in its
precision, the input preparer (tokenizer, normalisation) and the output mapping."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..graphs.checkpoint import weights_fingerprint
from ..graphs.normalization import LEROBOT_PREPROCESSOR, NormStats, load_checkpoint_norm_stats
from ..graphs.pi0 import PI0Model
from ..graphs.tokenizer import PromptTokenizer, demo_tokenizer_path
from ..graphs.weights import build_model
from .config import INTEGER_PRECISIONS, RuntimeConfig
from .handover import HandoverArrays, PreviousChunk
from .inputs import InputPreparer
from .policy import NonFiniteActions

log = logging.getLogger(__name__)

TOKENIZER_NAMES = ("tokenizer.model", "paligemma_tokenizer.model", "assets/paligemma_tokenizer.model")


@dataclass
class PolicyParts:
    config: RuntimeConfig
    model: PI0Model
    preparer: InputPreparer
    norm_stats: NormStats | None
    model_id: str  # the model's name and `weights_id`, for people
    random_weights: bool
    weights_id: str  # the random seed, or the checkpoint file's fingerprint (not its directory's name)
    startup_s: dict[str, float] = field(default_factory=dict)  # seconds per phase of building these parts

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def check_noise(self, noise) -> np.ndarray:
        shape = (self.config.model.action_horizon, self.config.model.action_dim)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise ValueError(f"noise: expected shape {list(shape)}, got {list(noise.shape)}")
        if not np.all(np.isfinite(noise)):
            raise ValueError("noise: contains NaN or inf")
        return noise

    def to_robot_actions(self, model_actions: np.ndarray) -> np.ndarray:
        """[horizon, action_dim] model space -> [n_action_steps, robot_action_dim] robot units."""
        actions = model_actions[: self.config.model.chunk_length]
        actions = self.norm_stats.unnormalize_actions(actions) if self.norm_stats else actions
        actions = np.ascontiguousarray(actions[:, : self.config.robot_action_dim], dtype=np.float32)
        if not np.all(np.isfinite(actions)):
            steps, dims = np.nonzero(~np.isfinite(actions))
            raise NonFiniteActions(
                f"actions: the model produced NaN or inf (steps {sorted(set(steps.tolist()))[:5]}, dims "
                f"{sorted(set(dims.tolist()))}); nothing sent to the robot. Check the checkpoint's weights "
                f"({self.model_id}) and the precision ({self.config.precision})"
            )
        return actions

    def to_model_actions(self, robot_actions: np.ndarray) -> np.ndarray:
        """[n, robot_action_dim] robot units -> [n, action_dim] model space, the dims the robot does not
        execute zero (the inverse of `to_robot_actions` on the dims it keeps)."""
        actions = np.asarray(robot_actions, dtype=np.float32)
        padded = np.zeros((actions.shape[0], self.config.model.action_dim), dtype=np.float32)
        padded[:, : self.config.robot_action_dim] = actions
        normalized = self.norm_stats.normalize_actions(padded) if self.norm_stats else padded
        normalized[:, self.config.robot_action_dim :] = 0.0
        return normalized

    def prepare_handover(self, previous: PreviousChunk | None) -> tuple[PreviousChunk | None, HandoverArrays]:
        """The checked previous chunk (ValueError naming the field) and what the denoising loop reads."""
        config, model = self.config, self.config.model
        handover = config.handover_settings
        if previous is not None:
            previous = previous.checked(config.robot_action_dim)
        model_actions = self.to_model_actions(previous.actions) if previous is not None else None
        arrays = HandoverArrays.build(
            handover, previous, model_actions, model.action_horizon, model.action_dim, config.robot_action_dim
        )
        return previous, arrays

    def finish_chunk(self, model_actions: np.ndarray, previous: PreviousChunk | None) -> dict:
        """The ActionChunk fields that come from the model's output: robot actions with the hand-over's
        host-side part applied, the mode, and how many actions were frozen."""
        actions = self.to_robot_actions(model_actions)
        handover = self.config.handover_settings
        frozen = (
            previous.frozen_steps(len(actions)) if previous is not None and handover.mode != "switch" else 0
        )
        return {
            "actions": handover.finish(actions, previous),
            "handover": handover.mode,
            "frozen_steps": frozen,
        }


def resolve_tokenizer(config: RuntimeConfig) -> Path:
    if config.tokenizer:
        return Path(config.tokenizer)
    if config.checkpoint:
        for name in TOKENIZER_NAMES:
            candidate = Path(config.checkpoint) / name
            if candidate.is_file():
                return candidate
        raise ValueError(
            f"tokenizer: none found in {config.checkpoint} (looked for {', '.join(TOKENIZER_NAMES)}); "
            "pass the PaliGemma SentencePiece model with --tokenizer"
        )
    return demo_tokenizer_path()


def resolve_norm_stats(config: RuntimeConfig) -> NormStats | None:
    """A trained checkpoint's statistics; one without any is refused unless `allow_unnormalized`, so that
    actions in normalised units never reach a robot by accident."""
    if not config.checkpoint:
        return None
    stats = load_checkpoint_norm_stats(config.checkpoint, config.robot, config.model.pi05)
    if stats is None:
        if not config.allow_unnormalized:
            raise ValueError(
                f"norm_stats: checkpoint {config.checkpoint} has no normalisation statistics (looked for "
                f"assets/<robot>/norm_stats.json and lerobot's {LEROBOT_PREPROCESSOR} normaliser); its "
                "actions would reach the robot in normalised units. Copy the statistics of its training data "
                "next to it, or pass --allow-unnormalized (ROS: allow_unnormalized:=true)"
            )
        log.warning("no normalisation statistics in %s: state and actions pass through", config.checkpoint)
    else:
        check_norm_stats_cover_the_robot(stats, config)
        log.info("normalisation statistics from %s", stats.source)
    return stats


def check_norm_stats_cover_the_robot(stats: NormStats, config: RuntimeConfig) -> None:
    """Statistics for the actions (unless `allow_unnormalized`), covering every dimension the robot
    executes, and for the state covering every one it sends: dimensions past the statistics pass through
    unchanged, so a short file would send some actions to the robot in normalised units."""
    if stats.actions is None and not config.allow_unnormalized:
        raise ValueError(
            f"norm_stats: {stats.source} has no statistics for the actions; they would reach the robot in "
            "normalised units (--allow-unnormalized to serve it anyway)"
        )
    for name, covered, needed, setting in (
        ("actions", stats.actions, config.robot_action_dim, "robot_action_dim"),
        ("state", stats.state, config.state_dim, "state_dim"),
    ):
        if covered is not None and covered.dims is not None and covered.dims < needed:
            raise ValueError(
                f"norm_stats: {stats.source}: {name} statistics cover {covered.dims} dimensions, the robot's "
                f"{setting} is {needed}"
            )


def build_parts(config: RuntimeConfig) -> PolicyParts:
    cfg = config.model
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device} requested but CUDA is not available")
    norm_stats = resolve_norm_stats(config)  # before the weights: a refusal should cost nothing
    started = time.perf_counter()
    model = build_model(cfg, config.device, config.checkpoint, seed=config.seed)
    model.set_precision(config.compute_dtype, config.vision_dtype)
    tokenizer = PromptTokenizer(resolve_tokenizer(config), cfg.max_token_len)
    if tokenizer.vocab_size > cfg.prefix_lm.vocab_size:
        raise ValueError(
            f"tokenizer: {tokenizer.vocab_size} pieces do not fit the model's vocabulary of "
            f"{cfg.prefix_lm.vocab_size}"
        )
    preparer = InputPreparer(
        cfg,
        tokenizer,
        norm_stats,
        config.state_dim,
        config.optional_camera_names,
        config.max_image_side,
        config.resizes_on_device,
    )
    random_weights = config.checkpoint is None
    # Names the weights: the seed, or a fingerprint of the checkpoint's file (calibrations are keyed by it).
    weights = (
        f"random-seed{config.seed}"
        if random_weights
        else weights_fingerprint(config.checkpoint_info.weights_path)
    )
    parts = PolicyParts(config, model, preparer, norm_stats, f"{cfg.name}:{weights}", random_weights, weights)
    parts.startup_s["weights"] = time.perf_counter() - started
    started = time.perf_counter()
    if config.precision == "fp8":
        prepare_fp8(parts)
    elif config.precision in INTEGER_PRECISIONS:
        from .integer_precision import prepare_integer

        prepare_integer(parts)
    if config.precision == "fp8" or config.precision in INTEGER_PRECISIONS:
        # quantising, calibrating (FP8 scales, the w4a8 smoothing) and the start-up accuracy gate
        parts.startup_s["quantise"] = time.perf_counter() - started
    return parts


def prepare_fp8(parts: PolicyParts) -> None:
    """Quantise the prefix's GEMM weights once (and the action expert's, with `fp8_expert`), then load the
    activation scales from `fp8_calibration` (refused if made for another model), or calibrate them on
    synthetic frames (saved to `fp8_calibration` when it names a file that does not exist yet; without
    one, kept under `compile_cache` so that the next start with the same weights loads them)."""
    from ..graphs.fp8 import fp8_supported
    from .calibration import attach_fp8, calibrate_scales, load_scales, save_scales, synthetic_observations
    from .compile_cache import synthetic_fp8_scales_path

    ok, why = fp8_supported(parts.device)
    if not ok:
        raise ValueError(f"precision: fp8 refused: {why}")
    config = parts.config
    modules = attach_fp8(parts, config.fp8_expert)
    path = Path(config.fp8_calibration) if config.fp8_calibration else None
    kept = synthetic_fp8_scales_path(config, parts.weights_id) if path is None else None
    if kept is not None and kept.exists():
        try:
            load_scales(parts, modules, kept, config.fp8_expert)
            log.warning(
                "fp8 activation scales calibrated on synthetic frames (kept in %s); for a trained "
                "checkpoint, calibrate on recorded observations (vla-runtime calibrate)",
                kept,
            )
            return
        except Exception as err:  # noqa: BLE001 - made for something else, or damaged: calibrate again
            log.warning("fp8 scales in the compile_cache not used (%s); calibrating", err)
    if path is not None and path.exists():
        meta = load_scales(parts, modules, path, config.fp8_expert)
        log.info(
            "fp8 activation scales from %s (%s frames of %s)", path, meta.get("frames"), meta.get("source")
        )
        return
    frames = synthetic_observations(parts, config.fp8_calibration_frames, config.seed)
    meta = calibrate_scales(
        parts, modules, frames, "synthetic", config.fp8_expert, config.fp8_calibration_margin, config.seed
    )
    log.warning(
        "fp8 activation scales calibrated on %d synthetic frames; for a trained checkpoint, calibrate on "
        "recorded observations (vla-runtime calibrate)",
        len(frames),
    )
    if path is not None:
        save_scales(modules, path, meta)
        log.info("fp8 activation scales saved to %s", path)
    elif kept is not None:
        keep_scales(modules, kept, meta)


def keep_scales(modules, path: Path, meta: dict[str, str]) -> None:
    """Save to a temporary file and rename it (a process starting beside this one reads the old file or
    the new one, never half of one); a cache that cannot be written costs only the next start's
    calibration."""
    from .calibration import save_scales

    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_scales(modules, temporary, meta)
        os.replace(temporary, path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for I/O failures
        log.warning("compile_cache: fp8 scales not kept at %s: %s", path, err)
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
