from __future__ import annotations

import json

import numpy as np
import pytest
from vla_runtime.graphs.normalization import NormStats, find_norm_stats


def write_stats(path, rng, dim=8):
    stats = {}
    for field in ("state", "actions"):
        q01 = rng.uniform(-2, 0, dim)
        stats[field] = {
            "mean": rng.normal(size=dim).tolist(),
            "std": rng.uniform(0.1, 2, dim).tolist(),
            "q01": q01.tolist(),
            "q99": (q01 + rng.uniform(0.5, 3, dim)).tolist(),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"norm_stats": stats}))
    return stats


@pytest.mark.parametrize("quantile", [False, True])
def test_formulas_match_openpi(tmp_path, rng, quantile):
    raw = write_stats(tmp_path / "assets" / "libero" / "norm_stats.json", rng)
    stats = NormStats.load(find_norm_stats(tmp_path, None), use_quantiles=quantile)
    x = rng.normal(size=8).astype(np.float32)
    s = {k: np.asarray(v, np.float32) for k, v in raw["state"].items()}
    a = {k: np.asarray(v, np.float32) for k, v in raw["actions"].items()}
    if quantile:
        expected = (x - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) * 2 - 1
        expected_back = (x + 1) / 2 * (a["q99"] - a["q01"] + 1e-6) + a["q01"]
    else:
        expected = (x - s["mean"]) / (s["std"] + 1e-6)
        expected_back = x * (a["std"] + 1e-6) + a["mean"]
    np.testing.assert_allclose(stats.normalize_state(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.unnormalize_actions(x), expected_back, rtol=1e-5, atol=1e-6)
    # Wider action vectors (the model's 32 dims) keep their extra dims unchanged.
    wide = rng.normal(size=(5, 12)).astype(np.float32)
    np.testing.assert_array_equal(stats.unnormalize_actions(wide)[:, 8:], wide[:, 8:])


def test_missing_quantiles_refused(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0], "std": [1.0]}}}))
    with pytest.raises(ValueError, match="norm_stats.state: quantile"):
        NormStats.load(path, use_quantiles=True)


def test_robot_choice(tmp_path, rng):
    write_stats(tmp_path / "assets" / "a" / "norm_stats.json", rng)
    write_stats(tmp_path / "assets" / "b" / "norm_stats.json", rng)
    with pytest.raises(ValueError, match="robot: .* several robots"):
        find_norm_stats(tmp_path, None)
    assert find_norm_stats(tmp_path, "b").parent.name == "b"
    with pytest.raises(ValueError, match="robot: no norm_stats.json for 'c'"):
        find_norm_stats(tmp_path, "c")
