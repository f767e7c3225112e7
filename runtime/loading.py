"""Assemble what every policy implementation needs from a RuntimeConfig: the model on its device in its
precision, the input preparer (tokenizer, normalisation) and the output mapping."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..graphs.normalization import NormStats, find_norm_stats
from ..graphs.pi0 import PI0Model
from ..graphs.tokenizer import PromptTokenizer, demo_tokenizer_path
from ..graphs.weights import build_model
from .config import RuntimeConfig
from .inputs import InputPreparer

log = logging.getLogger(__name__)

TOKENIZER_NAMES = ("tokenizer.model", "paligemma_tokenizer.model", "assets/paligemma_tokenizer.model")


@dataclass
class PolicyParts:
    config: RuntimeConfig
    model: PI0Model
    preparer: InputPreparer
    norm_stats: NormStats | None
    model_id: str
    random_weights: bool

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
        """[horizon, action_dim] model space -> [horizon, robot_action_dim] robot units."""
        actions = self.norm_stats.unnormalize_actions(model_actions) if self.norm_stats else model_actions
        return np.ascontiguousarray(actions[:, : self.config.robot_action_dim], dtype=np.float32)


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


def build_parts(config: RuntimeConfig) -> PolicyParts:
    cfg = config.model
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device} requested but CUDA is not available")
    model = build_model(cfg, config.device, config.checkpoint, seed=config.seed)
    model.set_precision(config.compute_dtype, config.vision_dtype)
    tokenizer = PromptTokenizer(resolve_tokenizer(config), cfg.max_token_len)
    if tokenizer.vocab_size > cfg.prefix_lm.vocab_size:
        raise ValueError(
            f"tokenizer: {tokenizer.vocab_size} pieces do not fit the model's vocabulary of "
            f"{cfg.prefix_lm.vocab_size}"
        )
    norm_stats = None
    if config.checkpoint:
        stats_path = find_norm_stats(config.checkpoint, config.robot)
        if stats_path is not None:
            norm_stats = NormStats.load(stats_path, use_quantiles=cfg.pi05)
        else:
            log.warning(
                "no norm_stats.json in %s: state and actions pass through unnormalised", config.checkpoint
            )
    preparer = InputPreparer(
        cfg, tokenizer, norm_stats, config.state_dim, config.optional_cameras, config.max_image_side
    )
    random_weights = config.checkpoint is None
    model_id = f"{cfg.name}:" + (
        f"random-seed{config.seed}" if random_weights else Path(config.checkpoint).name
    )
    parts = PolicyParts(config, model, preparer, norm_stats, model_id, random_weights)
    if config.precision == "fp8":
        prepare_fp8(parts)
    return parts


@torch.inference_mode()
def prepare_fp8(parts: PolicyParts) -> None:
    """Quantise the prefix's GEMM weights once (and the action expert's, with `fp8_expert`), then load
    or calibrate the activation scales: the expert's over every denoising step of the calibration frames."""
    from ..graphs.fp8 import (
        calibrate,
        fp8_modules,
        fp8_supported,
        load_calibration,
        quantize_prefix,
        quantize_stack,
        save_calibration,
    )
    from ..graphs.pi0 import time_schedule
    from .inputs import pixels_to_model_input
    from .synthetic import synthetic_observation

    ok, why = fp8_supported(parts.device)
    if not ok:
        raise ValueError(f"precision: fp8 refused: {why}")
    model, config = parts.model, parts.config
    quantize_prefix(model.prefix_lm)
    model.prefix_lm.set_fp8(True)
    modules = fp8_modules(model.prefix_lm)
    if config.fp8_expert:
        quantize_stack(model.expert)
        model.expert.set_fp8(True)
        modules.update(fp8_modules(model.expert, prefix="expert."))
    path = Path(config.fp8_calibration) if config.fp8_calibration else None
    if path is not None and path.exists():
        load_calibration(modules, path)
        log.info("fp8 activation scales loaded from %s", path)
        return
    rng = np.random.default_rng(config.seed)
    frames = [
        parts.preparer(synthetic_observation(config, rng)) for _ in range(config.fp8_calibration_frames)
    ]
    times, dt = time_schedule(config.denoising_steps)
    times = torch.from_numpy(times).to(parts.device)
    generator, cfg = torch.Generator().manual_seed(config.seed), config.model

    def run_frames():
        for f in frames:
            t = lambda a: torch.from_numpy(a)[None].to(parts.device)  # noqa: E731
            tokens = model.encode_images(pixels_to_model_input(t(f.pixels)))
            kv, mask = model.fill_prefix(tokens, t(f.image_masks), t(f.tokens), t(f.token_masks))
            if config.fp8_expert:
                noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=generator)
                noise = noise.to(parts.device)
                model.denoise(kv, mask, t(f.state), noise, times, dt)

    calibrate(modules, run_frames)
    log.info("fp8 activation scales calibrated on %d synthetic frames", len(frames))
    if path is not None:
        save_calibration(modules, path)
        log.info("fp8 activation scales saved to %s", path)
