"""What a checkpoint directory holds, read without loading its weights: the model it was trained as
(from config.json and the tensor header), its tensor layout, its prompt format and its statistics.

Two config.json dialects are read:
- openpi's converter: `action_dim`, `action_horizon`, `paligemma_variant`, `action_expert_variant`,
  `precision` (and, where present, `pi05`, `max_token_len`, `discrete_state_input`);
- lerobot's PI0Config / PI05Config: `type` (pi0 | pi05), `chunk_size`, `n_action_steps`, `max_state_dim`,
  `max_action_dim`, `tokenizer_max_length`, `num_inference_steps`, the variants, `image_resolution`,
  `empty_cameras`, `input_features`.
Widths and depths come from the variant tables in graphs/config.py; a checkpoint whose variant is not
there may state its shapes explicitly under `model_shape: {vision: {...}, prefix_lm: {...}, expert: {...}}`.
Whether the model is pi0 or pi0.5 is also visible in its tensors (pi0.5's time MLP, pi0's state
projection); config and tensors must agree.

Tensor layouts: openpi (no prefix) and lerobot (the same names under `model.`); the tied token embedding
may be stored as `embed_tokens` or only as the language model's `lm_head`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import (
    LM_VARIANTS,
    PI0_CAMERAS,
    VISION_OF_LM,
    VISION_VARIANTS,
    GemmaConfig,
    ModelConfig,
    SiglipConfig,
    variant_name,
)

log = logging.getLogger(__name__)

MAX_STEPS = 10  # the denoising steps the runtime serves (graphs/pi0.py MAX_DENOISING_STEPS)
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
EMBED_KEY = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "paligemma_with_expert.paligemma.lm_head.weight"
# Present in openpi checkpoints but never used to produce actions (the expert's language-model head).
UNUSED_KEYS = frozenset({"paligemma_with_expert.gemma_expert.lm_head.weight"})

# openpi's public training configs whose converted config.json does not record a prompt choice:
# matched by the start of the checkpoint directory's name (openpi src/openpi/training/config.py). Loading
# guesses only state_in_prompt from it (the horizon comes from config.json); the whole entry, as
# RuntimeConfig overrides, gives the benchmarks a checkpoint's shape without its weights.
KNOWN_OPENPI_CONFIGS = {
    # Pi0Config(pi05=True, action_horizon=10, discrete_state_input=False)
    "pi05_libero": {"state_in_prompt": False, "action_horizon": 10},
}


# The ModelConfig fields that are the architecture: they decide every parameter's name and shape. The
# horizon, prompt length and cameras decide none (the same weights serve any of them), and a fine-tune may
# change them.
ARCHITECTURE_FIELDS = ("pi05", "vision", "prefix_lm", "expert", "action_dim")


def architecture_differences(asked: ModelConfig, checkpoint: ModelConfig) -> list[str]:
    return [
        f"{name}: asked {getattr(asked, name)!r}, checkpoint {getattr(checkpoint, name)!r}"
        for name in ARCHITECTURE_FIELDS
        if getattr(asked, name) != getattr(checkpoint, name)
    ]


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as asked; the message names every offending field or tensor."""


@dataclass(frozen=True)
class CheckpointInfo:
    directory: Path
    layout: str  # tensor names: "openpi" (no prefix) or "lerobot" (under "model.")
    dialect: str  # config.json: "openpi", "lerobot" or "none"
    model: ModelConfig
    sources: dict[str, str]  # model field -> where its value came from
    tensor_shapes: dict[str, tuple[int, ...]]  # by openpi name (layout prefix removed)
    embedding_from_lm_head: bool  # the tied embedding is stored only as lm_head
    unused: tuple[str, ...]  # stored, read by nothing (reported once, ignored)
    stated: dict[str, object]  # model facts the checkpoint states, by RuntimeConfig setting name
    tensor_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # by openpi name: F32, BF16, ...

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_FILE

    def stored_name(self, openpi_name: str) -> str:
        return (LEROBOT_PREFIX if self.layout == "lerobot" else "") + openpi_name

    def summary(self) -> dict:
        m = self.model
        return {
            "directory": str(self.directory),
            "layout": self.layout,
            "config_dialect": self.dialect,
            "family": "pi05" if m.pi05 else "pi0",
            "vision": variant_name(VISION_VARIANTS, m.vision) or dataclasses.asdict(m.vision),
            "prefix_lm": variant_name(LM_VARIANTS, m.prefix_lm) or dataclasses.asdict(m.prefix_lm),
            "expert": variant_name(LM_VARIANTS, m.expert) or dataclasses.asdict(m.expert),
            "action_dim": m.action_dim,
            "action_horizon": m.action_horizon,
            "actions_offered": m.chunk_length,
            "max_token_len": m.max_token_len,
            "prompt_format": m.prompt_format,
            "default_steps": m.default_steps,
            "cameras": list(m.camera_names),
            "image_size": m.vision.image_size,
            "tensors": len(self.tensor_shapes),
            "embedding_from_lm_head": self.embedding_from_lm_head,
            "unused_tensors": list(self.unused),
            "sources": self.sources,
        }


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


def read_config_json(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON: {err}") from None
    except OSError as err:  # a folder of that name, unreadable
        raise CheckpointError(f"checkpoint: cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint: {path} must hold a JSON object")
    return data


def read_tensor_header(weights: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Stored name -> shape, and -> dtype (safetensors' names: F32, BF16, I64, ...), from the header
    alone (no tensor data is read)."""
    if not weights.exists():
        raise CheckpointError(f"checkpoint: no {WEIGHTS_FILE} in {weights.parent}")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            shapes = {name: tuple(tensor.get_shape()) for name, tensor in slices.items()}
            return shapes, {name: tensor.get_dtype() for name, tensor in slices.items()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint: {weights} is not a readable safetensors file: {err}") from None


def weights_fingerprint(weights: Path, samples: int = 32, block: int = 1 << 16) -> str:
    """A digest of a weights file that reads about 2 MB whatever its size: the header (every name, dtype,
    shape and offset), the file size and `samples` evenly spaced blocks of the data. It tells checkpoints
    apart (a fine-tune changes every block); it is not a cryptographic hash of every byte."""
    digest = hashlib.sha256()
    size = weights.stat().st_size
    digest.update(str(size).encode())
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        digest.update(f.read(min(header_len, size)))
        for i in range(samples):
            f.seek((size - block) * i // max(1, samples - 1) if size > block else 0)
            digest.update(f.read(block))
    return digest.hexdigest()[:16]


def _gemma_from_dict(field: str, d: dict, vocab_size: int) -> GemmaConfig:
    try:
        return GemmaConfig(**{"vocab_size": vocab_size, **d})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint: model_shape.{field}: {err}") from None


def _config_bool(cfg: dict, key: str, directory) -> bool:
    """A true/false of config.json: JSON's own, not a string ("false" would read as true)."""
    value = cfg[key]
    if not isinstance(value, bool):
        raise CheckpointError(
            f"checkpoint {directory}: config.json {key} must be true or false, got {value!r}"
        )
    return value


def _stack_config(field: str, variant: str | None, explicit: dict | None, vocab_size: int) -> GemmaConfig:
    if explicit is not None:
        return _gemma_from_dict(field, explicit, vocab_size)
    if not isinstance(variant, str) or variant not in LM_VARIANTS:
        raise CheckpointError(
            f"checkpoint: {field} variant {variant!r} is not one of {', '.join(sorted(LM_VARIANTS))}; "
            f"give its shape under model_shape.{field} in config.json"
        )
    return dataclasses.replace(LM_VARIANTS[variant], vocab_size=vocab_size)


def _family_from_tensors(shapes: dict) -> bool | None:
    if "time_mlp_in.weight" in shapes:
        return True
    if "state_proj.weight" in shapes:
        return False
    return None


def derive_model(
    directory: Path, cfg: dict, shapes: dict[str, tuple[int, ...]]
) -> tuple[ModelConfig, dict[str, str], dict[str, object], str]:
    """config.json + tensor shapes (openpi names) -> (model, where each value came from, the facts the
    checkpoint states by setting name, the config dialect)."""
    lerobot = cfg.get("type") is not None
    if lerobot and cfg["type"] not in ("pi0", "pi05"):
        raise CheckpointError(f"checkpoint: config.json type {cfg['type']!r} is not pi0 or pi05")
    dialect = "lerobot" if lerobot else ("openpi" if cfg else "none")
    sources: dict[str, str] = {}
    stated: dict[str, object] = {}

    def pick(field: str, keys: tuple[str, ...], default, setting: str | None = None):
        for key in keys:
            if key in cfg and cfg[key] is not None:
                sources[field] = f"config.json {key}"
                if setting:
                    stated[setting] = cfg[key]
                return cfg[key]
        sources[field] = "default"
        return default

    # Family: config.json where it says so, else the tensors; the two must agree.
    from_tensors = _family_from_tensors(shapes)
    if lerobot:
        pi05, sources["pi05"] = cfg["type"] == "pi05", "config.json type"
    elif "pi05" in cfg:
        pi05, sources["pi05"] = _config_bool(cfg, "pi05", directory), "config.json pi05"
    elif from_tensors is not None:
        pi05, sources["pi05"] = from_tensors, "tensors (time_mlp_in / state_proj)"
    else:
        raise CheckpointError(
            f"checkpoint {directory}: cannot tell pi0 from pi0.5 (no time_mlp_in or state_proj)"
        )
    if from_tensors is not None and from_tensors != pi05:
        raise CheckpointError(
            f"checkpoint {directory}: {sources['pi05']} says {'pi05' if pi05 else 'pi0'}, "
            f"its tensors are {'pi05' if from_tensors else 'pi0'}'s"
        )

    explicit = cfg.get("model_shape") or {}
    if not isinstance(explicit, dict):
        raise CheckpointError("checkpoint: config.json model_shape must be an object")
    lm_variant = pick("prefix_lm", ("paligemma_variant",), "gemma_2b")
    expert_variant = pick("expert", ("action_expert_variant",), "gemma_300m")
    embed = shapes.get(EMBED_KEY) or shapes.get(LM_HEAD_KEY)
    vocab = embed[0] if embed else (LM_VARIANTS.get(lm_variant) or LM_VARIANTS["gemma_2b"]).vocab_size
    prefix_lm = _stack_config("prefix_lm", lm_variant, explicit.get("prefix_lm"), vocab)
    expert = _stack_config("expert", expert_variant, explicit.get("expert"), 0)
    if "vision" in explicit:
        try:
            vision = SiglipConfig(**explicit["vision"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint: model_shape.vision: {err}") from None
        sources["vision"] = "config.json model_shape.vision"
    else:
        vision = VISION_VARIANTS[VISION_OF_LM.get(lm_variant, "so400m/14")]
        sources["vision"] = f"paired with {lm_variant}"
    resolution = cfg.get("image_resolution")
    if resolution is not None:
        if not (
            isinstance(resolution, (list, tuple)) and len(resolution) == 2 and resolution[0] == resolution[1]
        ):
            raise CheckpointError(
                f"checkpoint: image_resolution {resolution!r}: only square images are served"
            )
        vision = dataclasses.replace(vision, image_size=int(resolution[0]))
        sources["vision.image_size"] = "config.json image_resolution"

    in_proj = shapes.get("action_in_proj.weight")
    action_dim = pick(
        "action_dim", ("action_dim", "max_action_dim"), in_proj[1] if in_proj else 32, "action_dim"
    )
    if lerobot and cfg.get("max_state_dim", action_dim) != action_dim:
        raise CheckpointError(
            f"checkpoint: max_state_dim ({cfg['max_state_dim']}) != max_action_dim ({action_dim}): "
            "the runtime pads the state to the action width"
        )
    horizon = pick("action_horizon", ("action_horizon", "chunk_size"), 50, "action_horizon")
    token_len = pick(
        "max_token_len", ("max_token_len", "tokenizer_max_length"), 200 if pi05 else 48, "max_token_len"
    )
    n_action_steps = pick("n_action_steps", ("n_action_steps",), None)
    steps = pick("default_steps", ("num_inference_steps",), 10)
    if isinstance(steps, int) and steps > MAX_STEPS:
        log.warning(
            "checkpoint: num_inference_steps %d is over the runtime's %d; serving %d",
            steps,
            MAX_STEPS,
            MAX_STEPS,
        )
        steps, sources["default_steps"] = MAX_STEPS, f"config.json num_inference_steps, capped at {MAX_STEPS}"

    state_in_prompt = None
    if pi05:
        if "discrete_state_input" in cfg:
            state_in_prompt, sources["state_in_prompt"] = (
                _config_bool(cfg, "discrete_state_input", directory),
                "config.json discrete_state_input",
            )
        elif lerobot:  # lerobot's pi05 always writes the discretised state into the prompt
            state_in_prompt, sources["state_in_prompt"] = True, "lerobot pi05"
        else:
            for name, facts in KNOWN_OPENPI_CONFIGS.items():
                if directory.name.startswith(name):
                    # A guess from the name, not a statement: an explicit setting overrides it.
                    state_in_prompt = facts["state_in_prompt"]
                    sources["state_in_prompt"] = f"guessed from the directory name (openpi's {name} config)"
        if state_in_prompt is not None and "guessed" not in sources.get("state_in_prompt", ""):
            stated["state_in_prompt"] = state_in_prompt

    cameras = PI0_CAMERAS
    features = cfg.get("input_features")
    if isinstance(features, dict):
        named = tuple(k.split(".", 2)[2] for k in features if k.startswith("observation.images."))
        if named:
            cameras = named
            sources["cameras"] = "config.json input_features"
    try:
        empty = int(cfg.get("empty_cameras") or 0)
    except (TypeError, ValueError):
        raise CheckpointError(
            f"checkpoint: config.json empty_cameras {cfg['empty_cameras']!r} is not a number"
        ) from None
    cameras = cameras + tuple(f"empty_camera_{i}" for i in range(empty))

    try:
        model = ModelConfig(
            name=directory.name,
            pi05=pi05,
            vision=vision,
            prefix_lm=prefix_lm,
            expert=expert,
            action_dim=int(action_dim),
            action_horizon=int(horizon),
            max_token_len=int(token_len),
            camera_names=cameras,
            default_steps=int(steps),
            state_in_prompt=state_in_prompt,
            n_action_steps=None if n_action_steps is None else int(n_action_steps),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory}: config.json: {err}") from None
    return model, sources, stated, dialect


def inspect_checkpoint(directory: str | Path) -> CheckpointInfo:
    """Read config.json and the safetensors header: seconds, whatever the checkpoint's size."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint: {directory} is not a directory")
    stored, stored_dtypes = read_tensor_header(directory / WEIGHTS_FILE)
    layout = "lerobot" if stored and all(n.startswith(LEROBOT_PREFIX) for n in stored) else "openpi"
    shapes = {n[len(LEROBOT_PREFIX) :] if layout == "lerobot" else n: s for n, s in stored.items()}
    dtypes = {n[len(LEROBOT_PREFIX) :] if layout == "lerobot" else n: d for n, d in stored_dtypes.items()}
    model, sources, stated, dialect = derive_model(directory, read_config_json(directory), shapes)
    from_lm_head = EMBED_KEY not in shapes and LM_HEAD_KEY in shapes
    unused = sorted(k for k in shapes if k in UNUSED_KEYS or (k == LM_HEAD_KEY and not from_lm_head))
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    return CheckpointInfo(
        directory,
        layout,
        dialect,
        model,
        sources,
        shapes,
        from_lm_head,
        tuple(prefix + k for k in unused),
        stated,
        dtypes,
    )


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """openpi name -> shape of every parameter the runtime's model has (built on the meta device)."""
    from .pi0 import PI0Model

    with torch.device("meta"):
        module = PI0Model(model)
    return {module_key_to_openpi(k): tuple(v.shape) for k, v in module.named_parameters()}


def source_name(info: CheckpointInfo, openpi_name: str) -> str:
    """The stored name that provides a parameter (the tied embedding may come from lm_head)."""
    if openpi_name == EMBED_KEY and info.embedding_from_lm_head:
        openpi_name = LM_HEAD_KEY
    return openpi_name


def check_tensors(info: CheckpointInfo) -> list[str]:
    """Every missing, unexpected and mis-shaped tensor, grouped; empty when the checkpoint fits."""
    expected = expected_shapes(info.model)
    provided = {source_name(info, k): k for k in expected}
    unused = {k[len(LEROBOT_PREFIX) :] if info.layout == "lerobot" else k for k in info.unused}
    missing = [info.stored_name(s) for s in provided if s not in info.tensor_shapes]
    unexpected = [info.stored_name(n) for n in info.tensor_shapes if n not in provided and n not in unused]
    misshaped = [
        f"{info.stored_name(s)}: checkpoint {list(info.tensor_shapes[s])}, model {list(expected[k])}"
        for s, k in provided.items()
        if s in info.tensor_shapes and info.tensor_shapes[s] != expected[k]
    ]
    not_float = [  # an integer or bool tensor would be cast to the model's float silently
        f"{info.stored_name(s)}: {info.tensor_dtypes[s]}"
        for s in provided
        if s in info.tensor_dtypes and not info.tensor_dtypes[s].startswith(("F", "BF"))
    ]
    problems = []
    for title, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("not floating-point", not_float),
    ):
        if names:
            problems.append(
                f"{title} tensors ({len(names)}):\n" + "\n".join("  " + g for g in group_names(names))
            )
    return problems


def group_names(names: list[str]) -> list[str]:
    """Collapse per-layer names: 18 `...layers.N.mlp.down_proj.weight` become one line with N in 0-17."""
    groups: dict[str, list[int]] = defaultdict(list)
    singles = []
    for name in names:
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m is None:
            singles.append(name)
        else:
            groups[name[: m.start()] + ".layers.{N}." + name[m.end() :]].append(int(m.group(1)))
    lines = sorted(singles)
    for pattern, layers in sorted(groups.items()):
        lines.append(
            pattern.replace("{N}", "{" + _ranges(sorted(layers)) + "}")
            if len(layers) > 1
            else pattern.replace("{N}", str(layers[0]))
        )
    return lines


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
