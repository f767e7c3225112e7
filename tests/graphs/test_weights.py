"""Checkpoints: the model comes from config.json and the tensor header; openpi and lerobot layouts and
dialects, the tied embedding stored only as lm_head, pi05_libero's horizon-10 state-free prompt. Each
loads and gives the actions of the model it was saved from; wrong combinations are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from vla_runtime.graphs.checkpoint import EMBED_KEY, LM_HEAD_KEY, group_names, inspect_checkpoint
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.weights import CheckpointError, build_model, module_key_to_openpi, save_checkpoint
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation

# (directory name, preset, layout, embedding storage, config.json overrides, overrides of the random twin)
LAYOUTS = {
    "openpi": ("pi05_tiny_openpi", "pi05_tiny", "openpi", "embed_tokens", {}, {}),
    "lerobot": ("pi05_tiny_lerobot", "pi05_tiny", "lerobot", "embed_tokens", {}, {}),
    "lm_head_only": ("pi0_tiny_lm_head", "pi0_tiny", "openpi", "lm_head", {}, {}),
    "lerobot_lm_head_only": ("pi0_tiny_lerobot", "pi0_tiny", "lerobot", "lm_head", {}, {}),
    # openpi's pi05_libero: horizon 10 (here 6), trained without the state in the prompt; its converted
    # config.json does not say so: the directory name is matched against openpi's training configs.
    "pi05_libero": (
        "pi05_libero_tiny",
        "pi05_tiny",
        "openpi",
        "both",
        {"action_horizon": 6},
        {"action_horizon": 6, "state_in_prompt": False},
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each layout written from a model with fresh random weights: {name: (directory, twin config)}."""
    root, out = tmp_path_factory.mktemp("ckpt"), {}
    for name, (dirname, preset, layout, embedding, ckpt_over, twin_over) in LAYOUTS.items():
        seed = int(np.random.default_rng().integers(1 << 20))
        twin = RuntimeConfig(preset=preset, seed=seed, **twin_over)
        model = build_model(twin.model, seed=seed)
        directory = save_checkpoint(model, root / dirname, layout, embedding, ckpt_over)
        out[name] = (directory, twin)
    return out


def test_openpi_and_lerobot_names(checkpoints):
    names = set(load_file(checkpoints["openpi"][0] / "model.safetensors"))
    assert EMBED_KEY in names and LM_HEAD_KEY not in names
    assert all(n.startswith(("paligemma_with_expert.", "action_", "time_mlp_")) for n in names)
    lerobot = set(load_file(checkpoints["lerobot"][0] / "model.safetensors"))
    assert lerobot == {"model." + n for n in names}
    only_head = set(load_file(checkpoints["lm_head_only"][0] / "model.safetensors"))
    assert LM_HEAD_KEY in only_head and EMBED_KEY not in only_head


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_loads_and_matches_the_model_it_was_saved_from(checkpoints, spm_path, rng, name):
    directory, twin = checkpoints[name]
    # No preset: the model comes from the checkpoint alone.
    config = RuntimeConfig(checkpoint=str(directory), tokenizer=spm_path, allow_unnormalized=True)
    got, want = config.model, twin.model
    assert got.replace(name=want.name, state_in_prompt=None, n_action_steps=None) == want.replace(
        state_in_prompt=None
    )
    assert (got.prompt_format, got.chunk_length) == (want.prompt_format, want.chunk_length)
    loaded = EagerPolicy(config)
    reference = EagerPolicy(twin.replace(tokenizer=spm_path))
    for _ in range(2):
        obs = random_observation(rng)
        noise = rng.standard_normal((twin.model.action_horizon, twin.model.action_dim), dtype=np.float32)
        a, b = loaded.infer(obs, noise=noise), reference.infer(obs, noise=noise)
        assert a.actions.shape == (twin.model.action_horizon, 7)
        np.testing.assert_array_equal(a.actions, b.actions)
    assert not loaded.parts.random_weights and loaded.parts.model_id.startswith(directory.name + ":")


def test_what_inspect_detects(checkpoints):
    libero = inspect_checkpoint(checkpoints["pi05_libero"][0])
    assert (libero.layout, libero.dialect, libero.model.action_horizon) == ("openpi", "openpi", 6)
    assert (
        libero.model.prompt_format == "pi05_no_state" and "pi05_libero" in libero.sources["state_in_prompt"]
    )
    assert libero.unused == (LM_HEAD_KEY,) and not libero.embedding_from_lm_head
    lerobot = inspect_checkpoint(checkpoints["lerobot_lm_head_only"][0])
    assert (lerobot.layout, lerobot.dialect, lerobot.model.pi05) == ("lerobot", "lerobot", False)
    assert lerobot.embedding_from_lm_head and lerobot.model.prompt_format == "pi0"
    assert lerobot.sources["action_horizon"] == "config.json chunk_size"
    pi05 = inspect_checkpoint(checkpoints["lerobot"][0])
    assert (
        pi05.model.prompt_format == "pi05_state"
        and pi05.model.camera_names == get_preset("pi05_tiny").camera_names
    )


def test_family_from_the_tensors_when_config_json_is_silent(checkpoints):
    """openpi's converter writes no family: pi0's state projection / pi0.5's time MLP tell."""
    cfg = json.loads((checkpoints["lm_head_only"][0] / "config.json").read_text())
    assert "pi05" not in cfg and "type" not in cfg
    info = inspect_checkpoint(checkpoints["lm_head_only"][0])
    assert info.model.pi05 is False and info.sources["pi05"].startswith("tensors")


def _copy(src, dst, edit_tensors=None, edit_config=None):
    tensors = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_broken_checkpoint_names_every_bad_tensor_grouped(checkpoints, tmp_path):
    src = checkpoints["openpi"][0]
    q = "paligemma_with_expert.paligemma.model.language_model.layers.{}.self_attn.q_proj.weight"
    fc1 = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"

    def edit(t):
        del t[q.format(0)], t[q.format(1)], t["action_out_proj.bias"]
        t["some_extra.weight"] = torch.zeros(3)
        t[fc1] = torch.zeros(5, 5)
        t["action_out_proj.weight"] = t["action_out_proj.weight"].to(torch.int64)  # would be cast silently

    broken = _copy(src, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as err:
        EagerPolicy(RuntimeConfig(checkpoint=str(broken), allow_unnormalized=True))
    message = str(err.value)
    for expected in (
        q.format("{0-1}"),  # both layers on one line
        "action_out_proj.bias",
        "some_extra.weight",
        f"{fc1}: checkpoint [5, 5]",
        "missing tensors (3):",
        "unexpected tensors (1):",
        "mis-shaped tensors (1):",
        "not floating-point tensors (1):",
        "action_out_proj.weight: I64",
    ):
        assert expected in message, message
    assert message.count("\n") < 12  # grouped and readable, not one line per key


def test_expert_lm_head_is_reported_unused_and_ignored(checkpoints, tmp_path):
    src = checkpoints["openpi"][0]
    head = "paligemma_with_expert.gemma_expert.lm_head.weight"
    ok = _copy(src, tmp_path / "with_head", lambda t: t.update({head: torch.zeros(2, 2)}))
    assert inspect_checkpoint(ok).unused == (head,)
    build_model(inspect_checkpoint(ok).model, checkpoint=ok)


def test_wrong_combinations_are_refused_naming_both_values(checkpoints, tmp_path):
    libero = str(checkpoints["pi05_libero"][0])
    with pytest.raises(ValueError, match=r"preset: pi0_tiny .*pi05: preset False, checkpoint True"):
        RuntimeConfig(preset="pi0_tiny", checkpoint=libero)
    # a preset of the same architecture is fine: the checkpoint's horizon wins
    assert RuntimeConfig(preset="pi05_tiny", checkpoint=libero).model.action_horizon == 6
    with pytest.raises(
        ValueError, match=r"action_horizon: 50 was asked, but .* says 6 \(config.json action_horizon\)"
    ):
        RuntimeConfig(checkpoint=libero, action_horizon=50)
    # lerobot's pi0.5 states that its prompt has the state; openpi's directory-name guess is only a guess,
    # so a fine-tune named pi05_libero_* that was trained with the state can say so
    with pytest.raises(
        ValueError, match=r"state_in_prompt: False was asked, but .* says True \(lerobot pi05\)"
    ):
        RuntimeConfig(checkpoint=str(checkpoints["lerobot"][0]), state_in_prompt=False)
    assert RuntimeConfig(checkpoint=libero, state_in_prompt=True).model.prompt_format == "pi05_state"
    with pytest.raises(ValueError, match="state_in_prompt: pi0 reads the state from a state token"):
        RuntimeConfig(checkpoint=str(checkpoints["lm_head_only"][0]), state_in_prompt=True)
    with pytest.raises(ValueError, match=r"n_action_steps: must be in 1..action_horizon \(6\)"):
        RuntimeConfig(checkpoint=libero, n_action_steps=7)
    src = checkpoints["lerobot"][0]
    lying = _copy(src, tmp_path / "lying", edit_config=lambda c: c.update(type="pi0"))
    with pytest.raises(CheckpointError, match="config.json type says pi0, its tensors are pi05's"):
        inspect_checkpoint(lying)
    odd = _copy(src, tmp_path / "odd", edit_config=lambda c: c.update(paligemma_variant="gemma_9b"))
    with pytest.raises(
        CheckpointError, match=r"prefix_lm variant 'gemma_9b' is not one of .*model_shape.prefix_lm"
    ):
        inspect_checkpoint(odd)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        inspect_checkpoint(tmp_path)
    listed = _copy(src, tmp_path / "listed", edit_config=lambda c: c.update(paligemma_variant=["x"]))
    with pytest.raises(CheckpointError, match=r"prefix_lm variant \['x'\] is not one of"):
        inspect_checkpoint(listed)
    worded = _copy(
        checkpoints["pi05_libero"][0], tmp_path / "worded", edit_config=lambda c: c.update(pi05="false")
    )
    with pytest.raises(CheckpointError, match="config.json pi05 must be true or false, got 'false'"):
        inspect_checkpoint(worded)


def test_explicit_shapes_for_a_variant_not_in_the_table(tmp_path, spm_path, rng):
    """A checkpoint may state its shapes where no variant names them; they round-trip exactly."""
    base = get_preset("pi05_tiny")
    custom = base.replace(
        expert=base.expert.__class__(width=48, depth=2, mlp_dim=96, num_heads=2, num_kv_heads=1, head_dim=16)
    )
    model = build_model(custom, seed=3)
    directory = save_checkpoint(model, tmp_path / "custom", "lerobot")
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["action_expert_variant"] == "custom" and cfg["model_shape"]["expert"]["width"] == 48
    info = inspect_checkpoint(directory)
    assert info.model.expert == custom.expert
    noise = rng.standard_normal((10, 8), dtype=np.float32)
    obs = random_observation(rng)
    a = EagerPolicy(
        RuntimeConfig(checkpoint=str(directory), tokenizer=spm_path, allow_unnormalized=True)
    ).infer(obs, noise)
    assert a.actions.shape == (10, 7) and np.all(np.isfinite(a.actions))


def test_trained_checkpoint_without_statistics_is_refused(checkpoints, spm_path):
    directory = str(checkpoints["openpi"][0])
    with pytest.raises(
        ValueError, match=r"norm_stats: .* has no normalisation statistics .*--allow-unnormalized"
    ):
        EagerPolicy(RuntimeConfig(checkpoint=directory, tokenizer=spm_path))


def test_statistics_are_applied(checkpoints, tmp_path, spm_path, rng):
    """openpi quantile statistics: the normalised state enters the prompt; actions return in robot units."""
    from ..graphs.test_normalization import write_stats

    src, twin = checkpoints["openpi"]
    directory = _copy(src, tmp_path / "with_stats")
    raw = write_stats(directory / "assets" / "libero" / "norm_stats.json", rng, dim=8)
    policy = EagerPolicy(RuntimeConfig(checkpoint=str(directory), tokenizer=spm_path))
    reference = EagerPolicy(twin.replace(tokenizer=spm_path))
    obs = random_observation(rng)
    a = {k: np.asarray(v, np.float32) for k, v in raw["actions"].items()}
    s = {k: np.asarray(v, np.float32) for k, v in raw["state"].items()}
    normalized_obs = random_observation(rng)
    normalized_obs.state = (obs.state - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) * 2 - 1
    normalized_obs.images, normalized_obs.instruction = obs.images, obs.instruction
    noise = rng.standard_normal((10, 8), dtype=np.float32)
    got = policy.infer(obs, noise).actions
    model_space = reference.infer(normalized_obs, noise).actions
    expected = (model_space + 1) / 2 * (a["q99"][:7] - a["q01"][:7] + 1e-6) + a["q01"][:7]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_n_action_steps_trims_what_the_robot_is_offered(checkpoints, spm_path, rng):
    directory = str(checkpoints["pi05_libero"][0])
    policy = EagerPolicy(
        RuntimeConfig(checkpoint=directory, tokenizer=spm_path, allow_unnormalized=True, n_action_steps=4)
    )
    assert policy.infer(random_observation(rng)).actions.shape == (4, 7)


def test_group_names_collapses_layers():
    names = [f"x.layers.{i}.w" for i in (0, 1, 2, 5)] + ["y.bias"]
    assert group_names(names) == ["y.bias", "x.layers.{0-2,5}.w"]


@pytest.mark.parametrize("preset", ["pi0_tiny", "pi05_tiny"])
def test_key_mapping_round_trips(preset):
    """Every module key maps to an openpi name and back to itself, and no two share an openpi name."""
    from vla_runtime.graphs.checkpoint import openpi_key_to_module

    names = list(build_model(get_preset(preset)).state_dict())
    openpi = [module_key_to_openpi(name) for name in names]
    assert all(k.startswith(("paligemma_with_expert.", "action_", "state_proj", "time_mlp")) for k in openpi)
    assert len(set(openpi)) == len(names)
    assert [openpi_key_to_module(k) for k in openpi] == names


def test_a_config_json_that_is_a_folder_is_named(tmp_path):
    from vla_runtime.graphs.checkpoint import read_config_json

    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"checkpoint: cannot read .*config.json"):
        read_config_json(tmp_path)
