"""Shape profiles on the CPU (tiny presets, fresh random inputs): a frame runs the smallest shape that
holds it (the cameras present, the prompt padded to a bucket) and gets the actions of the full shape."""

from __future__ import annotations

import time

import numpy as np
import pytest
from vla_runtime.runtime.buffers import PROMPT_BUCKETS, prompt_bucket
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.stages import StageRunner, allow_a_compile_per_shape, stage_shapes
from vla_runtime.runtime.types import Observation

from ..conftest import random_observation


def test_prompt_buckets():
    assert [prompt_bucket(n, 200) for n in (1, 32, 33, 64, 65, 128, 129, 200)] == [
        32,
        32,
        64,
        64,
        128,
        128,
        200,
        200,
    ]
    assert prompt_bucket(40, 48) == 48 and PROMPT_BUCKETS == (32, 64, 128)


@pytest.mark.parametrize("preset", ["pi05_tiny", "pi0_tiny"])
def test_small_shapes_give_the_full_shapes_actions(preset):
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset=preset, shape_profiles=True, max_batch=2))
    reference = EagerPolicy(parts=parts)
    cfg = parts.config.model
    optional = parts.config.optional_camera_names[0]
    cases = []
    for repeats in (
        1,
        4,
        10,
        25,
        60,
    ):  # prompts of different buckets (those over the model's length left out)
        for skip in ((), (optional,)):
            obs = random_observation(rng, preset, skip=skip)
            text = " ".join(["red"] * repeats)
            obs = Observation(obs.images, obs.state, text, obs.timestamp)
            try:
                parts.preparer(obs)
            except ValueError:
                continue
            noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
            cases.append((obs, noise))
    assert len(cases) >= 4
    with PipelinedExecutor(parts=parts) as executor:
        for obs, noise in cases:
            got = executor.infer(obs, noise).actions
            np.testing.assert_allclose(got, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5)
        # a batch of two robots with different cameras and prompts: each row in its own compacted layout
        (a, noise_a), (b, noise_b) = cases[1], cases[2]
        futures = executor.submit_batch([a, b], [noise_a, noise_b])
        for (obs, noise), future in zip([(a, noise_a), (b, noise_b)], futures, strict=True):
            np.testing.assert_allclose(
                future.result(timeout=120).actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5
            )
        shapes = {(p["views"], p["prompt_len"]) for p in executor.report()["profiles"]}
    assert any(views == 2 for views, _ in shapes), shapes  # the optional camera's absence saved a view
    assert any(length < cfg.max_token_len for _, length in shapes), shapes  # and a short prompt, tokens


def test_infer_waits_for_a_new_shapes_capture_longer_than_the_device_timeout(monkeypatch):
    """A new shape's compilation and capture can take a minute on a GPU, longer than infer's wait for a
    frame on the device; infer waits it out instead of raising TimeoutError."""
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", shape_profiles=True))
    with PipelinedExecutor(parts=parts) as executor:
        # infer's wait for one frame made short; the device timeout (the watchdog's) left as it is
        monkeypatch.setattr(executor, "_idle_timeout", lambda: 0.3)
        build = StageRunner.__init__
        slow = 3 * executor._idle_timeout()

        def slow_build(self, *args, **kwargs):
            time.sleep(slow)
            build(self, *args, **kwargs)

        monkeypatch.setattr(StageRunner, "__init__", slow_build)
        obs = random_observation(rng, "pi05_tiny", skip=parts.config.optional_camera_names[:1])
        profiles = len(executor.report()["profiles"])
        assert executor.infer(obs).actions.shape[0] == parts.config.model.chunk_length
        assert len(executor.report()["profiles"]) == profiles + 1  # the frame needed a new shape


def test_a_compiled_stage_meets_every_profiles_shape_compiled_and_one_more_is_an_error():
    """Dynamo's default recompile limit (8) would run every further shape eagerly without a word; a
    stage function under the runtime's limits compiles each profile's shape and fails loudly past them."""
    import torch

    allow_a_compile_per_shape(cameras=3)
    limit = 2 * stage_shapes(cameras=3)
    assert limit > 8 and torch._dynamo.config.fail_on_recompile_limit_hit

    def stage(x):  # a fresh code object: dynamo counts compiles per code object
        return x * 2 + 1

    compiled = torch.compile(stage, backend="eager", dynamic=False)
    for n in range(1, limit + 1):  # one shape per profile, all compiled
        assert torch.equal(compiled(torch.ones(n)), torch.full((n,), 3.0))
    with pytest.raises(Exception, match="recompile"):
        compiled(torch.ones(limit + 1))


def test_a_robots_prompt_bucket_follows_its_instruction_not_its_state():
    """pi0.5 writes the state into the prompt, so the token count changes with the state's digits from
    frame to frame; the bucket is sized for the widest state, so one robot stays in one shape (a new shape
    is a capture, seconds with the device idle on a GPU)."""
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", shape_profiles=True))
    assert parts.config.model.prompt_has_state
    base = random_observation(rng, "pi05_tiny")
    frames = [
        Observation(base.images, rng.uniform(-1, 1, base.state.shape).astype(np.float32), "pick it", 0.0)
        for _ in range(30)
    ]
    frames.append(Observation(base.images, np.zeros_like(base.state), "pick it", 0.0))  # every value "128"
    prepared = [parts.preparer(obs) for obs in frames]
    counts = {int(p.token_masks.sum()) for p in prepared}
    assert len(counts) > 1, counts  # the state's digits change the prompt's length
    assert len({p.prompt_room for p in prepared}) == 1 and prepared[0].prompt_room >= max(counts)
    with PipelinedExecutor(parts=parts) as executor:
        before = len(executor.report()["profiles"])
        for obs in frames[:6]:
            executor.infer(obs)
        assert len(executor.report()["profiles"]) == before + 1  # one shape for all of them
