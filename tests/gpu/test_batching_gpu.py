"""Full pi05 on the GPU, batched and in shape profiles: each member of a captured batch equals its eager
batch-1 result (different prompts, cameras, noise, previous chunks); a frame with a camera absent and a
short prompt, run in its small profile, equals the eager full-shape result."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.handover import PreviousChunk
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.types import Observation

from ..conftest import random_observation
from .test_executor_gpu import BF16_REL_TOL


@pytest.fixture(scope="module")
def pi05_parts(cuda):
    """pi05's weights, built once; each test's executor compiles only the shapes it needs."""
    config = RuntimeConfig(
        preset="pi05", device="cuda", precision="bf16", max_batch=4, shape_profiles=True, handover="inpaint"
    )  # inpaint: the previous chunk given to a member changes its actions
    return build_parts(config)


@pytest.fixture(scope="module")
def pi05_batched(pi05_parts):
    executor = PipelinedExecutor(parts=pi05_parts)
    yield executor, EagerPolicy(parts=pi05_parts)
    executor.close()


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def member(rng, executor, skip=(), words: int = 6, previous: bool = False):
    cfg, config = executor.config.model, executor.config
    obs = random_observation(rng, "pi05", side=224, skip=skip)
    text = " ".join(rng.choice(["pick", "place", "the", "red", "bowl", "on", "plate"], size=words))
    obs = Observation(obs.images, obs.state, text, obs.timestamp)
    noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
    old = rng.uniform(-1, 1, (cfg.chunk_length, config.robot_action_dim)).astype(np.float32)
    return obs, noise, PreviousChunk(old, int(rng.integers(0, 4))) if previous else None


def test_a_batch_of_four_robots_equals_each_alone(pi05_batched, rng):
    executor, reference = pi05_batched
    optional = executor.config.optional_camera_names[0]
    members = [
        member(rng, executor, skip=(optional,) if i % 2 else (), words=4 + 8 * i, previous=i == 3)
        for i in range(4)
    ]
    observations, noises, previous = map(list, zip(*members, strict=True))
    futures = executor.submit_batch(observations, noises, previous=previous)
    for (obs, noise, prev), future in zip(members, futures, strict=True):
        got = future.result(timeout=300).actions
        worst = relative_difference(got, reference.infer(obs, noise, prev).actions)
        assert worst <= BF16_REL_TOL, worst
        if prev is not None:
            np.testing.assert_array_equal(got[: prev.delay_steps], prev.actions[: prev.delay_steps])


def test_a_libero_shaped_frame_runs_its_small_profile_with_the_full_shapes_actions(pi05_batched, rng):
    executor, reference = pi05_batched
    optional = executor.config.optional_camera_names[0]
    for _ in range(3):
        obs, noise, _ = member(rng, executor, skip=(optional,), words=8)
        got = executor.infer(obs, noise).actions
        worst = relative_difference(got, reference.infer(obs, noise).actions)
        assert worst <= BF16_REL_TOL, worst
    shapes = {(p["views"], p["prompt_len"], p["batch"]) for p in executor.report()["profiles"]}
    full = (executor.config.model.num_views, executor.config.model.max_token_len)
    assert any(views < full[0] and prompt < full[1] and batch == 1 for views, prompt, batch in shapes), shapes


def test_shapes_named_ahead_are_captured_at_start_and_nothing_is_captured_while_serving(pi05_parts, rng):
    """A robot's settings: ahead_shapes "2x64" and capture_new_shapes false (the fixture's weights,
    another executor). A LIBERO-shaped frame runs in its shape captured at start; a frame of a shape not
    named runs in the full shape; no capture happens while serving; both give the eager actions."""
    parts, reference = pi05_parts, EagerPolicy(parts=pi05_parts)
    config = parts.config.replace(max_batch=1, ahead_shapes="2x64", capture_new_shapes=False)
    robot = PipelinedExecutor(parts=type(parts)(**{**vars(parts), "config": config}))
    try:
        started = robot.report()
        full = (config.model.num_views, config.model.max_token_len)
        assert {(p["views"], p["prompt_len"]) for p in started["profiles"]} == {full, (2, 64)}
        optional = config.optional_camera_names[0]
        cases = [member(rng, robot, skip=(optional,), words=2), member(rng, robot, words=2)]
        assert robot.parts.preparer(cases[0][0]).prompt_room <= 64  # the LIBERO-shaped frame fits 2x64
        for obs, noise, _ in cases:
            got = robot.infer(obs, noise).actions
            assert relative_difference(got, reference.infer(obs, noise).actions) <= BF16_REL_TOL
        report = robot.report()
        assert report["counters"]["captures"] == started["counters"]["captures"]  # none while serving
        assert report["counters"]["larger_shape"] == 1  # the three-camera frame, in the full shape
    finally:
        robot.close()
