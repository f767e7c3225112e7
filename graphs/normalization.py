"""Normalisation statistics (`assets/<robot>/norm_stats.json`), applied as openpi's transforms do.

z-score:  (x - mean) / (std + 1e-6)                 and back  x * (std + 1e-6) + mean
quantile: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1    and back  (x + 1) / 2 * (q99 - q01 + 1e-6) + q01
openpi uses quantiles for pi0.5 and z-scores for pi0. Values past the stats' width pass through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EPS = 1e-6


@dataclass(frozen=True)
class FieldStats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    @classmethod
    def from_json(cls, name: str, d: dict) -> FieldStats:
        try:
            arrays = {k: np.asarray(d[k], dtype=np.float32) for k in ("mean", "std")}
        except KeyError as err:
            raise ValueError(f"norm_stats.{name}: missing {err.args[0]!r}") from None
        for k in ("q01", "q99"):
            arrays[k] = np.asarray(d[k], dtype=np.float32) if d.get(k) is not None else None
        return cls(**arrays)


def _fit(stat: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split x into the part the stats cover and the rest."""
    n = min(stat.shape[-1], x.shape[-1])
    return x[..., :n], x[..., n:]


@dataclass(frozen=True)
class NormStats:
    state: FieldStats | None
    actions: FieldStats | None
    use_quantiles: bool

    @classmethod
    def load(cls, path: str | Path, use_quantiles: bool) -> NormStats:
        data = json.loads(Path(path).read_text())
        stats = data.get("norm_stats", data)
        fields = {k: FieldStats.from_json(k, stats[k]) if k in stats else None for k in ("state", "actions")}
        if use_quantiles:
            for k, f in fields.items():
                if f is not None and (f.q01 is None or f.q99 is None):
                    raise ValueError(f"norm_stats.{k}: quantile normalisation needs q01 and q99")
        return cls(use_quantiles=use_quantiles, **fields)

    def _apply(self, field: FieldStats | None, x: np.ndarray, inverse: bool) -> np.ndarray:
        if field is None:
            return x
        x = np.asarray(x, dtype=np.float32)
        if self.use_quantiles:
            lo, rest = _fit(field.q01, x)
            n = lo.shape[-1]
            q01, width = field.q01[:n], field.q99[:n] - field.q01[:n] + EPS
            out = (lo + 1.0) / 2.0 * width + q01 if inverse else (lo - q01) / width * 2.0 - 1.0
        else:
            lo, rest = _fit(field.mean, x)
            n = lo.shape[-1]
            mean, std = field.mean[:n], field.std[:n] + EPS
            out = lo * std + mean if inverse else (lo - mean) / std
        return np.concatenate([out, rest], axis=-1).astype(np.float32)

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return self._apply(self.state, state, inverse=False)

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return self._apply(self.actions, actions, inverse=True)


def find_norm_stats(checkpoint: str | Path, robot: str | None) -> Path | None:
    """`<checkpoint>/assets/<robot>/norm_stats.json`; with no robot named, the only one there."""
    assets = Path(checkpoint) / "assets"
    if robot is not None:
        path = assets / robot / "norm_stats.json"
        if not path.exists():
            raise ValueError(f"robot: no norm_stats.json for {robot!r} under {assets}")
        return path
    found = sorted(assets.glob("*/norm_stats.json")) if assets.is_dir() else []
    if len(found) > 1:
        raise ValueError(
            f"robot: {assets} holds stats for several robots "
            f"({', '.join(p.parent.name for p in found)}); name one"
        )
    return found[0] if found else None
