"""The eager reference policy: end to end on the tiny presets, reproducibility, and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.types import Observation

from ..conftest import random_observation


@pytest.fixture(scope="module", params=["pi0_tiny", "pi05_tiny"])
def policy(request):
    return EagerPolicy(RuntimeConfig(preset=request.param))


def test_end_to_end(policy, rng):
    obs = random_observation(rng, policy.config.preset)
    chunk = policy.infer(obs)
    cfg = policy.config.model
    assert chunk.actions.shape == (cfg.action_horizon, policy.config.robot_action_dim)
    assert chunk.actions.dtype == np.float32 and np.isfinite(chunk.actions).all()
    assert chunk.timestamp == obs.timestamp and chunk.steps == 10 and chunk.random_weights
    assert set(chunk.timings_ms) >= {"vision", "prefix", "denoise", "total"}
    assert chunk.model_id.startswith(policy.config.preset)


def test_noise_makes_runs_reproducible(policy, rng):
    obs = random_observation(rng, policy.config.preset)
    cfg = policy.config.model
    noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
    a, b = policy.infer(obs, noise), policy.infer(obs, noise)
    np.testing.assert_array_equal(a.actions, b.actions)
    c = policy.infer(obs)  # fresh noise
    assert np.abs(c.actions - a.actions).max() > 1e-3


def test_missing_optional_camera_is_masked(policy, rng):
    obs = random_observation(rng, policy.config.preset, skip=("right_wrist_0_rgb",))
    inputs = policy.parts.preparer(obs)
    assert inputs.image_masks.tolist() == [True, True, False]
    assert not inputs.pixels[2].any()
    assert np.isfinite(policy.infer(obs).actions).all()


def test_resize_keeps_aspect_with_black_padding(policy):
    wide = np.full((50, 200, 3), 255, dtype=np.uint8)
    obs = Observation(
        {"base_0_rgb": wide, "left_wrist_0_rgb": wide}, np.zeros(8, np.float32), "open the drawer"
    )
    pixels = policy.parts.preparer(obs).pixels[0]
    size = policy.config.model.vision.image_size
    assert pixels.shape == (size, size, 3)
    assert pixels[size // 2].min() == 255  # the middle row is image
    assert pixels[0].max() == 0 and pixels[-1].max() == 0  # top and bottom rows are padding


def bad_observations(rng):
    good = random_observation(rng, side=64)
    cams = dict(good.images)

    def with_images(**changes):
        images = {**cams, **changes}
        return Observation({k: v for k, v in images.items() if v is not None}, good.state, good.instruction)

    return [
        ("images['base_0_rgb']: dtype", with_images(base_0_rgb=cams["base_0_rgb"].astype(np.float32))),
        ("images['base_0_rgb']: shape", with_images(base_0_rgb=cams["base_0_rgb"][..., :2])),
        ("images['base_0_rgb']: shape", with_images(base_0_rgb=cams["base_0_rgb"][..., 0])),
        ("images['left_wrist_0_rgb']: size", with_images(left_wrist_0_rgb=np.zeros((0, 10, 3), np.uint8))),
        # a 1-pixel strip: its short side would resize to nothing
        (
            "images['left_wrist_0_rgb']: size 900x1 is narrower",
            with_images(left_wrist_0_rgb=np.zeros((1, 900, 3), np.uint8)),
        ),
        ("images: unknown camera", with_images(top_cam=cams["base_0_rgb"])),
        ("images: missing camera", with_images(base_0_rgb=None)),
        ("state: non-finite", Observation(cams, np.array([np.nan] + [0.0] * 7, np.float32), "go")),
        ("state: non-finite", Observation(cams, np.array([np.inf] + [0.0] * 7, np.float32), "go")),
        ("state: expected 8 values", Observation(cams, np.zeros(5, np.float32), "go")),
        ("state: must be a vector", Observation(cams, "abc", "go")),
        ("instruction: must be a non-empty", Observation(cams, good.state, "")),
        ("instruction: the prompt is", Observation(cams, good.state, "pick up the bowl " * 40)),
    ]


def test_every_bad_input_names_its_field_and_policy_keeps_serving(policy, rng):
    for field, obs in bad_observations(rng):
        with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
            policy.infer(obs)
        assert np.isfinite(policy.infer(random_observation(rng, policy.config.preset)).actions).all()
    with pytest.raises(ValueError, match="noise: expected shape"):
        policy.infer(random_observation(rng, policy.config.preset), np.zeros((3, 3), np.float32))


def test_bad_config_is_refused():
    for kwargs, field in (
        (dict(preset="nope"), "preset"),
        (dict(steps=0), "steps"),
        (dict(device="tpu"), "device"),
        (dict(state_dim=99), "state_dim"),
        (dict(optional_cameras=("x",)), "optional_cameras"),
        (dict(precision="int4"), "precision"),
        (dict(precision="bf16", fp8_expert=True), "fp8_expert"),
    ):
        with pytest.raises(ValueError, match=field):
            RuntimeConfig(**kwargs)


def test_the_reported_total_counts_from_submit_with_the_host_preparation_as_its_own_span(rng):
    """The host's preparation made at least 50 ms long (a sleep: only its lower bound is used): the chunk
    reports it as `prepare` and its total covers it, in the eager reference and the executor."""
    from vla_runtime.runtime.executor import PipelinedExecutor

    config = RuntimeConfig(preset="pi05_tiny")
    for policy in (EagerPolicy(config), PipelinedExecutor(config)):
        prepare = policy.parts.preparer
        policy.parts.preparer = lambda obs, prepare=prepare: (time.sleep(0.05), prepare(obs))[1]
        try:
            chunk = policy.infer(random_observation(rng, "pi05_tiny"))
        finally:
            policy.parts.preparer = prepare
            if hasattr(policy, "close"):
                policy.close()
        t = chunk.timings_ms
        assert t["prepare"] >= 50 and t["total"] >= t["prepare"] + t["vision"] + t["denoise"], t


def test_nan_actions_never_reach_the_robot(rng):
    """A checkpoint with a NaN weight: each chunk fails with NonFiniteActions naming the model, in the
    eager reference and the executor, instead of NaN actions; the executor serves the next frame."""
    import torch
    from vla_runtime.runtime.executor import PipelinedExecutor
    from vla_runtime.runtime.loading import build_parts
    from vla_runtime.runtime.policy import NonFiniteActions

    parts = build_parts(RuntimeConfig(preset="pi05_tiny"))
    weight = parts.model.action_out_proj.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with PipelinedExecutor(parts=parts) as executor:
        for policy in (EagerPolicy(parts=parts), executor):
            with pytest.raises(NonFiniteActions, match=r"actions: the model produced NaN or inf .*pi05_tiny"):
                policy.infer(random_observation(rng, "pi05_tiny"))
        with torch.no_grad():
            weight.copy_(kept)
        assert np.all(np.isfinite(executor.infer(random_observation(rng, "pi05_tiny")).actions))
