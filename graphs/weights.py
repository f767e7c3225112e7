"""Weights: seeded random initialisation, and openpi / lerobot checkpoint loading and saving.

A checkpoint directory holds `model.safetensors` and `config.json` (openpi's converted PyTorch
checkpoints; lerobot's carry the same tensor names under a `model.` prefix). What it holds is read by
graphs/checkpoint.py (`inspect_checkpoint`, `check_tensors`: one error naming every missing, unexpected and
mis-shaped tensor); this module creates the model and copies the tensors in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .checkpoint import (
    CONFIG_FILE,
    EMBED_KEY,
    LEROBOT_PREFIX,
    LM_HEAD_KEY,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointInfo,
    architecture_differences,
    check_tensors,
    inspect_checkpoint,
    module_key_to_openpi,
    source_name,
)
from .config import LM_VARIANTS, VISION_OF_LM, VISION_VARIANTS, ModelConfig
from .layers import GemmaRMSNorm
from .pi0 import PI0Model

log = logging.getLogger(__name__)


@torch.no_grad()
def random_init(model: PI0Model, seed: int) -> PI0Model:
    """Seeded random weights (normal, unit gain; norm scales near 1): repeatable demos and benchmarks."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):  # multiplies by its weight directly
            module.weight.normal_(1.0, 0.1, generator=gen)
            module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, GemmaRMSNorm) and module.dense is None:  # multiplies by (1 + weight)
            module.weight.normal_(0.0, 0.1, generator=gen)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            # Unit gain (std 1/sqrt(fan_in)) so every input visibly moves the actions, as trained weights do.
            module.weight.normal_(0.0, module.weight[0].numel() ** -0.5, generator=gen)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, module.weight.shape[1] ** -0.5, generator=gen)
    return model


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", checkpoint: str | Path | None = None, seed: int = 0
) -> PI0Model:
    """A float32 model on `device`, from a checkpoint directory or seeded random weights. The checkpoint
    must have been trained as `cfg` (RuntimeConfig derives `cfg` from it)."""
    with torch.device(device):
        model = PI0Model(cfg)
    model.eval().requires_grad_(False)
    if checkpoint is None:
        return random_init(model, seed)
    info = inspect_checkpoint(checkpoint)
    wrong = architecture_differences(cfg, info.model)
    if wrong:
        raise CheckpointError(f"checkpoint {checkpoint} was not trained as {cfg.name}: " + "; ".join(wrong))
    load_checkpoint(model, info)
    return model


@torch.no_grad()
def load_checkpoint(model: PI0Model, info: CheckpointInfo) -> None:
    problems = check_tensors(info)
    if problems:
        raise CheckpointError(
            f"checkpoint {info.directory} does not fit {model.cfg.name}:\n" + "\n".join(problems)
        )
    if info.unused:
        log.info(
            "checkpoint %s: %d tensors not used by the policy, ignored: %s",
            info.directory,
            len(info.unused),
            ", ".join(info.unused),
        )
    if info.embedding_from_lm_head:
        log.info("checkpoint %s: token embedding read from the tied lm_head", info.directory)
    params = dict(model.named_parameters())
    device = str(next(model.parameters()).device)
    with safe_open(str(info.weights_path), framework="pt", device=device) as f:
        for name, target in tqdm(
            params.items(), desc=f"loading {info.directory.name}", unit="tensor", leave=False
        ):
            stored = info.stored_name(source_name(info, module_key_to_openpi(name)))
            target.copy_(f.get_tensor(stored).to(target.dtype))
    log.info("loaded %d tensors from %s (%s layout)", len(params), info.weights_path, info.layout)


def save_checkpoint(
    model: PI0Model,
    directory: str | Path,
    layout: str = "openpi",
    embedding: str = "embed_tokens",
    config_overrides: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model.safetensors` + `config.json` as openpi's converter (layout "openpi") or lerobot
    (layout "lerobot": names under `model.`, lerobot's config.json) would. `embedding` stores the tied token
    embedding as "embed_tokens", "lm_head" (only) or "both". For tests and for exporting random weights."""
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"layout: must be 'openpi' or 'lerobot', got {layout!r}")
    if embedding not in ("embed_tokens", "lm_head", "both"):
        raise ValueError(f"embedding: must be embed_tokens, lm_head or both, got {embedding!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    tensors = {
        module_key_to_openpi(k): v.detach().to(dtype or v.dtype).contiguous().cpu()
        for k, v in model.named_parameters()
    }
    if embedding in ("lm_head", "both"):
        tensors[LM_HEAD_KEY] = tensors[EMBED_KEY].clone()
    if embedding == "lm_head":
        del tensors[EMBED_KEY]
    save_file({prefix + k: v for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    meta = (openpi_config_json if layout == "openpi" else lerobot_config_json)(model.cfg)
    if dtype is not None and layout == "openpi":
        meta["precision"] = str(dtype).removeprefix("torch.")
    (directory / CONFIG_FILE).write_text(json.dumps({**meta, **(config_overrides or {})}, indent=2))
    return directory


def _variants(cfg: ModelConfig) -> dict:
    """Variant names, and explicit shapes (`model_shape`) for what no variant names."""
    out, shapes = {}, {}
    for key, field in (("paligemma_variant", "prefix_lm"), ("action_expert_variant", "expert")):
        stack = getattr(cfg, field)
        name = next(
            (n for n, v in LM_VARIANTS.items() if dataclasses.replace(stack, vocab_size=v.vocab_size) == v),
            None,
        )
        if name is None:
            name, shapes[field] = "custom", dataclasses.asdict(stack)
        out[key] = name
    paired = VISION_OF_LM.get(out["paligemma_variant"])
    if paired is None or VISION_VARIANTS[paired] != cfg.vision:
        shapes["vision"] = dataclasses.asdict(cfg.vision)
    if shapes:
        out["model_shape"] = shapes
    return out


def openpi_config_json(cfg: ModelConfig) -> dict:
    """The keys openpi's converter writes (it records neither the family nor the prompt length: the family
    shows in the tensors, the prompt length is the family's default)."""
    return {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        **_variants(cfg),
        "precision": "float32",
    }


def lerobot_config_json(cfg: ModelConfig) -> dict:
    """lerobot's PI0Config / PI05Config as saved by `save_pretrained` (the fields the runtime reads)."""
    return {
        "type": "pi05" if cfg.pi05 else "pi0",
        **_variants(cfg),
        "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.chunk_length,
        "max_state_dim": cfg.action_dim,
        "max_action_dim": cfg.action_dim,
        "tokenizer_max_length": cfg.max_token_len,
        "num_inference_steps": cfg.default_steps,
        "image_resolution": [cfg.vision.image_size, cfg.vision.image_size],
        "empty_cameras": 0,
        "input_features": {
            **{
                f"observation.images.{c}": {
                    "type": "VISUAL",
                    "shape": [3, cfg.vision.image_size, cfg.vision.image_size],
                }
                for c in cfg.camera_names
            },
            "observation.state": {"type": "STATE", "shape": [cfg.action_dim]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [cfg.action_dim]}},
        "normalization_mapping": {
            "VISUAL": "IDENTITY",
            "STATE": "QUANTILES" if cfg.pi05 else "MEAN_STD",
            "ACTION": "QUANTILES" if cfg.pi05 else "MEAN_STD",
        },
    }
