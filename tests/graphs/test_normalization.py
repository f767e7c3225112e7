from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from vla_runtime.graphs.normalization import NormStats, find_norm_stats, load_checkpoint_norm_stats


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
    stats = NormStats.load_openpi(find_norm_stats(tmp_path, None), use_quantiles=quantile)
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
    with pytest.raises(ValueError, match=r"norm_stats.state .*quantiles normalisation needs q01, q99"):
        NormStats.load_openpi(path, use_quantiles=True)


def test_robot_choice(tmp_path, rng):
    write_stats(tmp_path / "assets" / "a" / "norm_stats.json", rng)
    write_stats(tmp_path / "assets" / "b" / "norm_stats.json", rng)
    with pytest.raises(ValueError, match="robot: .* several robots"):
        find_norm_stats(tmp_path, None)
    assert find_norm_stats(tmp_path, "b").parent.name == "b"
    with pytest.raises(ValueError, match="robot: no norm_stats.json for 'c'"):
        find_norm_stats(tmp_path, "c")


def write_lerobot_stats(directory, rng, norm_map, dim=8, postprocessor=True):
    """lerobot's pipeline files: the normaliser step names its statistics file (keys <feature>.<stat>)."""
    stats = {}
    for feature in ("observation.state", "action"):
        lo = rng.uniform(-2, 0, dim).astype(np.float32)
        stats.update(
            {
                f"{feature}.mean": rng.normal(size=dim).astype(np.float32),
                f"{feature}.std": rng.uniform(0.1, 2, dim).astype(np.float32),
                f"{feature}.min": lo,
                f"{feature}.max": lo + rng.uniform(0.5, 3, dim).astype(np.float32),
                f"{feature}.q01": lo + 0.1,
                f"{feature}.q99": lo + 0.2 + rng.uniform(0.5, 3, dim).astype(np.float32),
            }
        )
    stats["action.max"][0] = stats["action.min"][0]  # a constant dim: lerobot puts eps only where d == 0
    directory.mkdir(parents=True, exist_ok=True)

    def pipeline(name, registry, index, tensors):
        state_file = f"{name}_step_{index}_{registry}.safetensors"
        save_file(tensors, str(directory / state_file))
        steps = [{"registry_name": "rename_observations_processor", "config": {}}] * index + [
            {
                "registry_name": registry,
                "config": {"eps": 1e-8, "norm_map": norm_map},
                "state_file": state_file,
            }
        ]
        (directory / f"{name}.json").write_text(json.dumps({"name": name, "steps": steps}))

    pipeline("policy_preprocessor", "normalizer_processor", 3, stats)
    if postprocessor:  # its own action statistics: the ones lerobot applies to the outputs
        post = {k: v + 0.5 for k, v in stats.items() if k.startswith("action.")}
        pipeline("policy_postprocessor", "unnormalizer_processor", 0, post)
        stats.update(post)
    return stats


@pytest.mark.parametrize("mode", ["MEAN_STD", "QUANTILES", "MIN_MAX"])
def test_lerobot_statistics_and_formulas(tmp_path, rng, mode):
    raw = write_lerobot_stats(tmp_path, rng, {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode})
    stats = load_checkpoint_norm_stats(tmp_path, None, pi05=True)
    assert "policy_preprocessor_step_3_normalizer_processor" in stats.source
    x = rng.normal(size=8).astype(np.float32)
    s = {k.split(".")[-1]: v for k, v in raw.items() if k.startswith("observation.state.")}
    a = {k.split(".")[-1]: v for k, v in raw.items() if k.startswith("action.")}
    if mode == "MEAN_STD":
        expected = (x - s["mean"]) / (s["std"] + 1e-8)
        expected_back = x * a["std"] + a["mean"]
    else:
        lo, hi = ("q01", "q99") if mode == "QUANTILES" else ("min", "max")
        expected = 2 * (x - s[lo]) / (s[hi] - s[lo]) - 1
        d = a[hi] - a[lo]
        d = np.where(d == 0, 1e-8, d)
        expected_back = (x + 1) * d / 2 + a[lo]
    np.testing.assert_allclose(stats.normalize_state(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.unnormalize_actions(x), expected_back, rtol=1e-5, atol=1e-6)


def test_lerobot_base_checkpoint_without_statistics(tmp_path):
    """lerobot's base checkpoints ship pipeline files whose normaliser has no statistics file."""
    steps = [
        {
            "registry_name": "normalizer_processor",
            "config": {"norm_map": {"STATE": "QUANTILES"}, "features": {}},
        }
    ]
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps({"steps": steps}))
    assert load_checkpoint_norm_stats(tmp_path, None, pi05=True) is None
    (tmp_path / "policy_preprocessor.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="norm_stats: .*policy_preprocessor.json has no list of steps"):
        load_checkpoint_norm_stats(tmp_path, None, pi05=True)


def test_openpi_asset_id_with_a_slash(tmp_path, rng):
    """openpi's LIBERO stats live under assets/physical-intelligence/libero/."""
    write_stats(tmp_path / "assets" / "physical-intelligence" / "libero" / "norm_stats.json", rng)
    assert find_norm_stats(tmp_path, None).parent.name == "libero"
    assert find_norm_stats(tmp_path, "physical-intelligence/libero").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["actions"]["q99"].__setitem__(2, float("nan")), r"norm_stats.actions .*q99: non-finite"),
        (lambda s: s["state"].__setitem__("q01", 0.0), r"norm_stats.state .*q01: must be a list of numbers"),
        (lambda s: s["actions"].__setitem__("q01", [0.0] * 5), r"unequal lengths \(q01 5, q99 8\)"),
    ],
    ids=["nan", "scalar", "unequal"],
)
def test_malformed_statistics_are_refused_naming_the_field(tmp_path, rng, change, message):
    stats = write_stats(tmp_path / "norm_stats.json", rng)
    change(stats)
    (tmp_path / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    with pytest.raises(ValueError, match=message):
        NormStats.load_openpi(tmp_path / "norm_stats.json", use_quantiles=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vla_runtime.graphs.config import get_preset
    from vla_runtime.graphs.weights import build_model, save_checkpoint

    model = build_model(get_preset("pi05_tiny"), seed=1)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "pi05_tiny", "openpi", "lm_head")


@pytest.mark.parametrize(
    "dims, drop, message",
    [
        ({"actions": 3}, None, r"actions statistics cover 3 dimensions, the robot's robot_action_dim is 7"),
        ({"state": 5}, None, r"state statistics cover 5 dimensions, the robot's state_dim is 8"),
        ({}, "actions", r"has no statistics for the actions"),
    ],
    ids=["short actions", "short state", "no actions"],
)
def test_statistics_must_cover_what_the_robot_sends_and_executes(tiny_checkpoint, rng, dims, drop, message):
    """Dimensions past the statistics pass through, so a file shorter than the robot's actions would send
    some of them in normalised units; one without action statistics would send all of them so."""
    from vla_runtime.runtime.config import RuntimeConfig
    from vla_runtime.runtime.loading import resolve_norm_stats

    path = tiny_checkpoint / "assets" / "robot" / "norm_stats.json"
    stats = write_stats(path, rng)
    for field, n in dims.items():
        stats[field] = {k: v[:n] for k, v in stats[field].items()}
    if drop:
        del stats[drop]
    path.write_text(json.dumps({"norm_stats": stats}))
    config = RuntimeConfig(checkpoint=str(tiny_checkpoint))
    with pytest.raises(ValueError, match=message):
        resolve_norm_stats(config)
    if drop:  # served anyway when asked to
        assert resolve_norm_stats(config.replace(allow_unnormalized=True)).actions is None
    write_stats(path, rng)
    assert resolve_norm_stats(config).actions.dims == 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda step: step["config"].__setitem__("norm_map", ["QUANTILES"]),
            "config and its norm_map must be objects",
        ),
        (lambda step: step.__setitem__("config", [1]), "config and its norm_map must be objects"),
        (lambda step: step["config"].__setitem__("eps", [1]), "eps must be a small positive number"),
        (lambda step: step["config"].__setitem__("eps", "abc"), "eps must be a small positive number"),
        (lambda step: step.__setitem__("state_file", 5), "state_file must be a file name, got 5"),
    ],
    ids=["norm_map list", "config list", "eps list", "eps text", "state_file number"],
)
def test_a_malformed_lerobot_normaliser_step_is_named(tmp_path, rng, edit, message):
    write_lerobot_stats(tmp_path, rng, {"STATE": "QUANTILES", "ACTION": "QUANTILES"}, postprocessor=False)
    path = tmp_path / "policy_preprocessor.json"
    doc = json.loads(path.read_text())
    edit(doc["steps"][-1])
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=f"norm_stats: policy_preprocessor.json: normalizer_processor: {message}"
    ):
        load_checkpoint_norm_stats(tmp_path, None, pi05=True)
