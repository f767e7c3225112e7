"""Normalisation statistics, applied exactly as the framework that trained the checkpoint applies them.

openpi (`assets/<robot>/norm_stats.json`; quantiles for pi0.5, z-scores for pi0), eps added always:
    z-score:  (x - mean) / (std + 1e-6)                 and back  x * (std + 1e-6) + mean
    quantile: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1    and back  (x + 1) / 2 * (q99 - q01 + 1e-6) + q01
lerobot (the normaliser step of `policy_preprocessor.json`, its statistics in the safetensors file the
step names, keys `<feature>.<stat>`; the mode per feature type in the step's `norm_map`), eps = 1e-8:
    MEAN_STD:  (x - mean) / (std + eps)                 and back  x * std + mean
    QUANTILES: 2 (x - q01) / d - 1, d = q99 - q01       and back  (x + 1) d / 2 + q01
    MIN_MAX:   2 (x - min) / d - 1, d = max - min       and back  (x + 1) d / 2 + min
    (d is replaced by eps only where it is exactly 0); IDENTITY passes through.
Values past the statistics' width pass through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPENPI_EPS = 1e-6
LEROBOT_EPS = 1e-8
MODES = ("mean_std", "quantiles", "min_max", "identity")
LEROBOT_MODES = {
    "MEAN_STD": "mean_std",
    "QUANTILES": "quantiles",
    "MIN_MAX": "min_max",
    "IDENTITY": "identity",
}
LEROBOT_PREPROCESSOR = "policy_preprocessor.json"
LEROBOT_POSTPROCESSOR = "policy_postprocessor.json"
LEROBOT_STATE_KEY, LEROBOT_ACTION_KEY = "observation.state", "action"
NEEDED = {"mean_std": ("mean", "std"), "quantiles": ("q01", "q99"), "min_max": ("min", "max")}  # per mode


@dataclass(frozen=True)
class FieldStats:
    """One field's statistics and how to apply them (`convention`: openpi or lerobot eps handling)."""

    mode: str
    convention: str
    stats: dict[str, np.ndarray]
    eps: float = LEROBOT_EPS  # lerobot's normaliser step's own eps (openpi's is fixed)

    def __post_init__(self):
        """Each statistic the mode reads: one finite value per dimension, all of one length (a scalar, a
        NaN or stats of unequal lengths would otherwise surface as wrong actions, or an error at the
        first inference)."""
        missing = [k for k in NEEDED.get(self.mode, ()) if self.stats.get(k) is None]
        if missing:
            raise ValueError(f"{self.mode} normalisation needs {', '.join(missing)}")
        lengths = set()
        for key in NEEDED.get(self.mode, ()):
            value = self.stats[key]
            if value.ndim != 1 or value.size == 0:
                raise ValueError(
                    f"{key}: must be a list of numbers, one per dimension, got shape {value.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{key}: non-finite values at {np.flatnonzero(~np.isfinite(value)).tolist()}"
                )
            lengths.add(value.size)
        if len(lengths) > 1:
            sizes = ", ".join(f"{k} {self.stats[k].size}" for k in NEEDED[self.mode])
            raise ValueError(f"statistics of unequal lengths ({sizes})")

    @property
    def dims(self) -> int | None:
        """How many dimensions the statistics cover (None: identity, which covers every one)."""
        return self.stats[NEEDED[self.mode][0]].size if self.mode in NEEDED else None

    def _center_width(self, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(offset, width, centred on [-1, 1]) for the first n values."""
        s = {k: v[:n] for k, v in self.stats.items() if v is not None}
        if self.mode == "mean_std":
            return s["mean"], s["std"], False
        lo, hi = (s["q01"], s["q99"]) if self.mode == "quantiles" else (s["min"], s["max"])
        return lo, hi - lo, True

    def apply(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        if self.mode == "identity":
            return x
        n = min(self.dims, x.shape[-1])
        head, rest = x[..., :n], x[..., n:]
        offset, width, centred = self._center_width(n)
        if self.convention == "openpi":
            width = width + OPENPI_EPS
        elif centred:
            width = np.where(width == 0, self.eps, width)
        elif not inverse:  # lerobot MEAN_STD: eps in the forward direction only
            width = width + self.eps
        if centred:
            out = (head + 1.0) / 2.0 * width + offset if inverse else (head - offset) / width * 2.0 - 1.0
        else:
            out = head * width + offset if inverse else (head - offset) / width
        return np.concatenate([out, rest], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class NormStats:
    state: FieldStats | None
    actions: FieldStats | None
    source: str  # the file(s) they came from

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        x = np.asarray(state, dtype=np.float32)
        return self.state.apply(x, inverse=False) if self.state else x

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Robot units -> the model's (the inverse of `unnormalize_actions`, up to the eps terms)."""
        x = np.asarray(actions, dtype=np.float32)
        return self.actions.apply(x, inverse=False) if self.actions else x

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        x = np.asarray(actions, dtype=np.float32)
        return self.actions.apply(x, inverse=True) if self.actions else x

    @classmethod
    def load_openpi(cls, path: str | Path, use_quantiles: bool) -> NormStats:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"norm_stats: cannot read {path}: {err}") from None
        stats = data.get("norm_stats", data) if isinstance(data, dict) else None
        if not isinstance(stats, dict):
            raise ValueError(f"norm_stats: {path} must hold an object with state and actions")
        mode = "quantiles" if use_quantiles else "mean_std"

        def field(name: str) -> FieldStats | None:
            if name not in stats:
                return None
            try:
                arrays = {k: np.asarray(v, dtype=np.float32) for k, v in stats[name].items() if v is not None}
                return FieldStats(mode, "openpi", arrays)
            except (AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"norm_stats.{name} ({path}): {err}") from None

        return cls(field("state"), field("actions"), str(path))

    @classmethod
    def load_lerobot(cls, directory: str | Path) -> NormStats | None:
        """The statistics of lerobot's normaliser (pre-processor: state and actions) and un-normaliser
        (post-processor: actions) steps; None when the pipeline holds none (lerobot's base checkpoints)."""
        directory = Path(directory)
        state, actions, sources = None, None, []
        for pipeline, registry in (
            (LEROBOT_PREPROCESSOR, "normalizer_processor"),
            (LEROBOT_POSTPROCESSOR, "unnormalizer_processor"),
        ):
            found = _lerobot_step(directory / pipeline, registry)
            if found is None:
                continue
            norm_map, eps, tensors, path = found
            sources.append(path.name)
            for key, type_name, target in (
                (LEROBOT_STATE_KEY, "STATE", "state"),
                (LEROBOT_ACTION_KEY, "ACTION", "actions"),
            ):
                stats = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == key}
                if not stats:
                    continue
                mode = LEROBOT_MODES.get(str(norm_map.get(type_name, "IDENTITY")).upper())
                if mode is None:
                    raise ValueError(
                        f"norm_stats: {path.name}: unsupported norm_map {type_name}: {norm_map[type_name]!r}"
                    )
                try:
                    fs = FieldStats(mode, "lerobot", stats, eps)
                except ValueError as err:
                    raise ValueError(f"norm_stats: {path.name}: {key}: {err}") from None
                if target == "state" and state is None:
                    state = fs
                elif target == "actions":
                    actions = fs  # the post-processor's, when there is one, is what lerobot applies
        if state is None and actions is None:
            return None
        return cls(state, actions, ", ".join(sources))


def _lerobot_step(pipeline_json: Path, registry: str):
    """(norm_map, tensors, path) of the pipeline's step named `registry`, or None."""
    if not pipeline_json.exists():
        return None
    try:
        data = json.loads(pipeline_json.read_text())
    except ValueError as err:
        raise ValueError(f"norm_stats: {pipeline_json} is not valid JSON: {err}") from None
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list):
        raise ValueError(f"norm_stats: {pipeline_json} has no list of steps")
    for step in steps:
        if not isinstance(step, dict) or step.get("registry_name") != registry or not step.get("state_file"):
            continue
        from safetensors.numpy import load_file

        where = f"norm_stats: {pipeline_json.name}: {registry}"
        if not isinstance(step["state_file"], str):
            raise ValueError(f"{where}: state_file must be a file name, got {step['state_file']!r}")
        config = step.get("config") or {}
        if not isinstance(config, dict) or not isinstance(config.get("norm_map", {}), dict):
            raise ValueError(f"{where}: config and its norm_map must be objects")
        eps = config.get("eps", LEROBOT_EPS)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"{where}: eps must be a small positive number, got {eps!r}")
        path = pipeline_json.parent / step["state_file"]
        try:
            tensors = {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
        except Exception as err:  # noqa: BLE001 - a missing or corrupt file, named
            raise ValueError(f"norm_stats: cannot read {path}: {err}") from None
        return config.get("norm_map", {}), float(eps), tensors, path
    return None


def find_norm_stats(checkpoint: str | Path, robot: str | None) -> Path | None:
    """openpi's `<checkpoint>/assets/<robot>/norm_stats.json`; with no robot named, the only one there."""
    assets = Path(checkpoint) / "assets"
    if robot is not None:
        path = assets / robot / "norm_stats.json"
        if not path.exists():
            raise ValueError(f"robot: no norm_stats.json for {robot!r} under {assets}")
        return path
    found = sorted(assets.rglob("norm_stats.json")) if assets.is_dir() else []
    if len(found) > 1:
        names = ", ".join(str(p.parent.relative_to(assets)) for p in found)
        raise ValueError(f"robot: {assets} holds stats for several robots ({names}); name one with --robot")
    return found[0] if found else None


def load_checkpoint_norm_stats(checkpoint: str | Path, robot: str | None, pi05: bool) -> NormStats | None:
    """openpi's norm_stats.json where there is one, else lerobot's normaliser statistics, else None."""
    path = find_norm_stats(checkpoint, robot)
    if path is not None:
        return NormStats.load_openpi(path, use_quantiles=pi05)
    return NormStats.load_lerobot(checkpoint)
