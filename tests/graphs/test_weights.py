"""Checkpoints in openpi and lerobot layout: round trips, and broken ones refused with every key named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.weights import CheckpointError, build_model, module_key_to_openpi, save_checkpoint
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pi05_tiny model with random weights written in both layouts."""
    cfg = get_preset("pi05_tiny")
    model = build_model(cfg, seed=int(np.random.default_rng().integers(1000)))
    root = tmp_path_factory.mktemp("ckpt")
    return model, save_checkpoint(model, root / "openpi"), save_checkpoint(model, root / "lerobot", "lerobot")


def test_openpi_names_are_used(saved):
    _, openpi_dir, lerobot_dir = saved
    names = set(load_file(openpi_dir / "model.safetensors"))
    assert "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight" in names
    assert (
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"
        in names
    )
    assert "paligemma_with_expert.gemma_expert.model.layers.1.input_layernorm.dense.weight" in names
    assert "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight" in names
    assert "time_mlp_in.weight" in names
    assert {"model." + n for n in names} == set(load_file(lerobot_dir / "model.safetensors"))


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_round_trip_gives_identical_actions(saved, layout, spm_path, rng):
    model, openpi_dir, lerobot_dir = saved
    directory = openpi_dir if layout == "openpi" else lerobot_dir
    loaded = build_model(model.cfg, checkpoint=directory)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    config = RuntimeConfig(preset="pi05_tiny", checkpoint=str(directory), tokenizer=spm_path)
    from_ckpt = EagerPolicy(config)
    in_memory = EagerPolicy(config.replace(checkpoint=None))
    in_memory.parts.model.load_state_dict(model.state_dict())
    obs = random_observation(rng)
    noise = rng.standard_normal((model.cfg.action_horizon, model.cfg.action_dim), dtype=np.float32)
    np.testing.assert_array_equal(from_ckpt.infer(obs, noise).actions, in_memory.infer(obs, noise).actions)
    assert from_ckpt.infer(obs, noise).random_weights is False


def _rewrite(src_dir, dst_dir, edit):
    tensors = load_file(src_dir / "model.safetensors")
    edit(tensors)
    dst_dir.mkdir()
    save_file(tensors, str(dst_dir / "model.safetensors"))
    (dst_dir / "config.json").write_text((src_dir / "config.json").read_text())
    return dst_dir


def test_broken_checkpoint_names_every_bad_tensor(saved, tmp_path):
    model, openpi_dir, _ = saved
    q = "paligemma_with_expert.paligemma.model.language_model.layers.1.self_attn.q_proj.weight"
    fc1 = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"

    def edit(t):
        del t[q]
        del t["action_out_proj.bias"]
        t["some_extra.weight"] = torch.zeros(3)
        t[fc1] = torch.zeros(5, 5)

    broken = _rewrite(openpi_dir, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as err:
        build_model(model.cfg, checkpoint=broken)
    message = str(err.value)
    for expected in (
        q,
        "action_out_proj.bias",
        "some_extra.weight",
        fc1,
        "missing tensors (2)",
        "unexpected tensors (1)",
        "mis-shaped tensors (1)",
        "[5, 5]",
    ):
        assert expected in message
    assert "pi05_tiny" in message


def test_unused_language_heads_are_accepted(saved, tmp_path):
    model, openpi_dir, _ = saved
    ok = _rewrite(
        openpi_dir,
        tmp_path / "with_heads",
        lambda t: t.update({"paligemma_with_expert.paligemma.lm_head.weight": torch.zeros(2, 2)}),
    )
    build_model(model.cfg, checkpoint=ok)


def test_checkpoint_for_another_preset_is_refused(saved, tmp_path):
    _, openpi_dir, _ = saved
    with pytest.raises(CheckpointError, match="pi05"):
        build_model(get_preset("pi0_tiny"), checkpoint=openpi_dir)  # config.json says pi05
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        build_model(get_preset("pi05_tiny"), checkpoint=tmp_path)


def test_key_mapping_round_trips():
    model = build_model(get_preset("pi0_tiny"))
    for name in model.state_dict():
        openpi = module_key_to_openpi(name)
        assert openpi.startswith(("paligemma_with_expert.", "action_", "state_proj")), openpi
    assert json.loads(json.dumps({"ok": True}))
