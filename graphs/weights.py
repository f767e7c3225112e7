"""Weights: seeded random initialisation, and openpi / lerobot checkpoint loading and saving.

A checkpoint directory holds `model.safetensors` and `config.json` (openpi's converted PyTorch
checkpoints; lerobot's carry the same tensor names under a `model.` prefix). Loading checks every
tensor and raises one error naming all missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .config import ModelConfig
from .layers import GemmaRMSNorm
from .pi0 import PI0Model

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LEROBOT_PREFIX = "model."

# openpi checkpoint name prefix -> our module prefix. Names below the prefix are the same on both sides.
OPENPI_TO_MODULE = (
    ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.", "vision."),
    ("paligemma_with_expert.paligemma.model.multi_modal_projector.linear.", "projector."),
    ("paligemma_with_expert.paligemma.model.language_model.", "prefix_lm."),
    ("paligemma_with_expert.gemma_expert.model.", "expert."),
)
# Present in openpi checkpoints (the language-model heads) but never used to produce actions.
UNUSED_OPENPI_KEYS = frozenset(
    {
        "paligemma_with_expert.paligemma.lm_head.weight",
        "paligemma_with_expert.gemma_expert.lm_head.weight",
    }
)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the preset; the message names every offending tensor."""


def openpi_key_to_module(key: str) -> str:
    for theirs, ours in OPENPI_TO_MODULE:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def module_key_to_openpi(key: str) -> str:
    for theirs, ours in OPENPI_TO_MODULE:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


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
    """A float32 model on `device`, from a checkpoint directory or seeded random weights."""
    with torch.device(device):
        model = PI0Model(cfg)
    model.eval().requires_grad_(False)
    if checkpoint is None:
        return random_init(model, seed)
    load_checkpoint(model, checkpoint)
    return model


def read_checkpoint_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON: {err}") from None


def check_config_matches(cfg: ModelConfig, ckpt_cfg: dict, directory: Path) -> None:
    """Fields that config.json states (openpi or lerobot spelling) must agree with the preset."""
    expected = {
        "pi05": cfg.pi05,
        "action_dim": cfg.action_dim,
        "max_action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "chunk_size": cfg.action_horizon,
    }
    if ckpt_cfg.get("type") in ("pi0", "pi05"):  # lerobot names the variant in "type"
        ckpt_cfg = {**ckpt_cfg, "pi05": ckpt_cfg["type"] == "pi05"}
    wrong = [
        f"{k}: checkpoint says {ckpt_cfg[k]!r}, preset {cfg.name} has {v!r}"
        for k, v in expected.items()
        if k in ckpt_cfg and ckpt_cfg[k] != v
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {directory} does not fit preset {cfg.name}: " + "; ".join(wrong))


@torch.no_grad()
def load_checkpoint(model: PI0Model, directory: str | Path) -> None:
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"checkpoint: no {WEIGHTS_FILE} in {directory}")
    check_config_matches(model.cfg, read_checkpoint_config(directory), directory)
    params = dict(model.named_parameters())
    device = str(next(model.parameters()).device)
    with safe_open(str(weights), framework="pt", device=device) as f:
        names = list(f.keys())
        lerobot = bool(names) and all(n.startswith(LEROBOT_PREFIX) for n in names)
        unexpected, misshaped, loaded, seen = [], [], set(), set()
        for name in tqdm(names, desc=f"loading {directory.name}", unit="tensor", leave=False):
            openpi_name = name[len(LEROBOT_PREFIX) :] if lerobot else name
            if openpi_name in UNUSED_OPENPI_KEYS:
                continue
            target = params.get(openpi_key_to_module(openpi_name))
            if target is None:
                unexpected.append(name)
                continue
            seen.add(openpi_key_to_module(openpi_name))
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(target.shape):
                misshaped.append(f"{name}: checkpoint {list(shape)}, model {list(target.shape)}")
                continue
            target.copy_(f.get_tensor(name).to(target.dtype))
            loaded.add(openpi_key_to_module(openpi_name))
    prefix = LEROBOT_PREFIX if lerobot else ""
    missing = [prefix + module_key_to_openpi(k) for k in params if k not in seen]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(sorted(missing)))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): " + "; ".join(sorted(misshaped)))
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not fit preset {model.cfg.name}: " + " | ".join(problems)
        )
    log.info(
        "loaded %d tensors from %s (%s layout)", len(loaded), weights, "lerobot" if lerobot else "openpi"
    )


def save_checkpoint(model: PI0Model, directory: str | Path, layout: str = "openpi") -> Path:
    """Write `model.safetensors` + `config.json` in openpi's (or lerobot's) naming."""
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"layout: must be 'openpi' or 'lerobot', got {layout!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    tensors = {
        prefix + module_key_to_openpi(k): v.detach().contiguous().cpu() for k, v in model.named_parameters()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    cfg = model.cfg
    if layout == "openpi":
        meta = {
            "pi05": cfg.pi05,
            "action_dim": cfg.action_dim,
            "action_horizon": cfg.action_horizon,
            "max_token_len": cfg.max_token_len,
        }
    else:
        meta = {
            "type": "pi05" if cfg.pi05 else "pi0",
            "max_action_dim": cfg.action_dim,
            "chunk_size": cfg.action_horizon,
            "tokenizer_max_length": cfg.max_token_len,
        }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory
