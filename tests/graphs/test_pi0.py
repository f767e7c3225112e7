"""The split stage graphs (vision -> prefix KV cache -> k denoise steps) against one combined forward
without a KV cache, for pi0 and pi0.5, on fresh random weights and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.pi0 import time_schedule
from vla_runtime.graphs.weights import build_model


def random_inputs(cfg, batch: int, gen: torch.Generator):
    s = cfg.vision.image_size
    pixels = torch.rand(batch, cfg.num_views, 3, s, s, generator=gen) * 2 - 1
    image_masks = torch.ones(batch, cfg.num_views, dtype=torch.bool)
    image_masks[0, -1] = False  # a missing camera in the first sample
    tokens = torch.randint(0, cfg.prefix_lm.vocab_size, (batch, cfg.max_token_len), generator=gen)
    lengths = torch.randint(3, cfg.max_token_len, (batch,), generator=gen)
    token_masks = torch.arange(cfg.max_token_len)[None] < lengths[:, None]  # padded prompts
    state = torch.randn(batch, cfg.action_dim, generator=gen)
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=gen)
    return pixels, image_masks, tokens, token_masks, state, noise


@pytest.mark.parametrize("preset", ["pi0_tiny", "pi05_tiny"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_split_equals_uncached_joint_forward(preset, steps):
    cfg = get_preset(preset)
    seed = int(np.random.default_rng().integers(2**31))
    model = build_model(cfg, seed=seed)
    inputs = random_inputs(cfg, batch=2, gen=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        split = model.sample_actions(*inputs, steps=steps)
        joint = model.sample_actions_uncached(*inputs, steps=steps)
    assert split.shape == (2, cfg.action_horizon, cfg.action_dim)
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, joint, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    # The check can fail: a different prompt must change the actions.
    with torch.inference_mode():
        other = model.sample_actions(
            inputs[0], inputs[1], torch.roll(inputs[2], 1, 1), *inputs[3:], steps=steps
        )
    assert (other - split).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["pi0_tiny", "pi05_tiny"])
def test_padding_and_masked_camera_do_not_leak(preset):
    """Padded prompt tokens and a masked camera's pixels must not influence the actions."""
    cfg = get_preset(preset)
    model = build_model(cfg, seed=1)
    pixels, image_masks, tokens, token_masks, state, noise = random_inputs(
        cfg, 2, torch.Generator().manual_seed(3)
    )
    changed_pixels, changed_tokens = pixels.clone(), tokens.clone()
    changed_pixels[0, -1] = torch.rand_like(pixels[0, -1])  # the masked camera of sample 0
    changed_tokens[~token_masks] = 7  # only padding positions
    with torch.inference_mode():
        a = model.sample_actions(pixels, image_masks, tokens, token_masks, state, noise, steps=2)
        b = model.sample_actions(
            changed_pixels, image_masks, changed_tokens, token_masks, state, noise, steps=2
        )
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_time_schedule_matches_openpi_loop():
    for steps in range(1, 11):
        times, dt = time_schedule(steps)
        assert len(times) == steps and times[0] == 1.0 and dt == np.float32(-1.0 / steps)
        np.testing.assert_allclose(times, 1.0 - np.arange(steps) / steps, atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        time_schedule(0)
    with pytest.raises(ValueError, match="steps"):
        time_schedule(11)


def test_pi0_state_token_matters_and_pi05_ignores_continuous_state():
    gen = torch.Generator().manual_seed(5)
    for preset, should_change in (("pi0_tiny", True), ("pi05_tiny", False)):
        cfg = get_preset(preset)
        model = build_model(cfg, seed=2)
        pixels, image_masks, tokens, token_masks, state, noise = random_inputs(cfg, 1, gen)
        with torch.inference_mode():
            a = model.sample_actions(pixels, image_masks, tokens, token_masks, state, noise, steps=2)
            b = model.sample_actions(pixels, image_masks, tokens, token_masks, state + 1.0, noise, steps=2)
        assert bool((a - b).abs().max() > 1e-4) == should_change, preset


@pytest.mark.parametrize("preset", ["pi0_tiny", "pi05_tiny"])
def test_fused_projections_match_separate_ones(preset):
    """set_precision fuses q/k/v and gate/up into single GEMMs whose slices are the original parameters."""
    cfg = get_preset(preset)
    model = build_model(cfg, seed=int(np.random.default_rng().integers(1000)))
    inputs = random_inputs(cfg, 2, torch.Generator().manual_seed(11))
    names = sorted(model.state_dict())
    with torch.inference_mode():
        separate = model.sample_actions(*inputs, steps=3)
        model.set_precision(torch.float32)
        fused = model.sample_actions(*inputs, steps=3)
    assert model.prefix_lm.layers[0].self_attn.qkv_weight is not None
    assert model.expert.layers[0].mlp.gate_up_weight is not None
    assert sorted(model.state_dict()) == names  # checkpoint names unchanged
    q = model.prefix_lm.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == model.prefix_lm.layers[0].self_attn.qkv_weight.data_ptr()  # a view, not a copy
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)


def test_compiled_denoise_writes_suffix_keys_into_the_workspace():
    """The denoising step writes its suffix keys and values into the attention workspace in place;
    compiled (functionalised by AOTAutograd), it must give the eager result, leave the cached prefix and
    the key padding untouched, and write exactly the layers' suffix keys and values."""
    cfg = get_preset("pi05_tiny")
    seed = int(np.random.default_rng().integers(2**31))
    model = build_model(cfg, seed=seed)
    pixels, image_masks, tokens, token_masks, state, noise = random_inputs(
        cfg, batch=1, gen=torch.Generator().manual_seed(seed)
    )
    times, dt = time_schedule(3)
    times = torch.from_numpy(times)
    compiled = torch.compile(model.velocity, backend="aot_eager", dynamic=False)
    with torch.inference_mode():
        kv, mask = model.fill_prefix(model.encode_images(pixels), image_masks, tokens, token_masks)
        eager = model.denoise(kv, mask, state, noise, times, dt)
        actions = model.denoise(kv, mask, state, noise, times, dt, velocity_fn=compiled)
        workspace, p, s = model.attention_workspace(kv), kv.shape[-2], cfg.suffix_len
        bias, cos, sin = model.suffix_attention(mask)
        cond = model.step_conditioning(times, 1)[0]
        compiled(workspace, p, bias, cos, sin, state, noise, cond)
        # The first layer's suffix keys and values, computed directly.
        _, k, v, _ = model.expert.layers[0].qkv(
            model.suffix_embeddings(state, noise, cond), cos, sin, cond[0]
        )
    torch.testing.assert_close(actions, eager, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    assert len(workspace) == cfg.expert.depth
    for layer_kv, layer_cache in zip(workspace, kv, strict=True):
        assert layer_kv.shape[-2] % 8 == 0 and layer_kv.shape[-2] == p + s + model.key_padding(p)
        torch.testing.assert_close(layer_kv[..., :p, :], layer_cache, atol=0, rtol=0)
        assert layer_kv[..., p + s :, :].eq(0).all()
    torch.testing.assert_close(workspace[0][:, :, :, p : p + s], torch.stack([k, v]), atol=1e-6, rtol=1e-6)
