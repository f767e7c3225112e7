"""Batch profiles: several robots' observations computed in one batch equal each computed alone (the
eager reference), with different instructions, cameras, states, noise and previous chunks; the padding
rows of a larger profile change nothing; bad members are named."""

from __future__ import annotations

import numpy as np
import pytest
from vla_runtime.runtime.buffers import BATCH_SIZES, ShapeProfile, batch_profile, batch_sizes, largest_batch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.handover import PreviousChunk
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.server import PolicyServer

from ..conftest import random_observation


def test_batch_profiles():
    assert [batch_profile(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert batch_sizes(1) == (1,) and batch_sizes(4) == (1, 2, 4) and batch_sizes(8) == BATCH_SIZES
    with pytest.raises(ValueError, match="batch: at most 8"):
        batch_profile(9)
    with pytest.raises(ValueError, match="batch: must be in 1..8"):
        ShapeProfile(3, 16, 10, batch=9)
    with pytest.raises(ValueError, match="max_batch: must be one of .* with powers_of_two"):
        RuntimeConfig(max_batch=3)
    # every size: a batch of n runs in a profile of n
    assert batch_sizes(3, "every_size") == (1, 2, 3) and batch_sizes(8, "every_size") == tuple(range(1, 9))
    # more robots than the largest profile: the largest, the robots beyond it wait a batch
    robots = [1, 2, 3, 5, 8, 12, 16]
    assert [largest_batch(n) for n in robots] == [1, 2, 4, 8, 8, 8, 8]
    assert [largest_batch(n, "every_size") for n in robots] == [1, 2, 3, 5, 8, 8, 8]
    assert RuntimeConfig(max_batch=3, batch_profiles="every_size").max_batch == 3
    assert batch_profile(5, "every_size") == 5 and batch_profile(5) == 8
    with pytest.raises(ValueError, match="max_batch: must be one of"):
        RuntimeConfig(max_batch=9, batch_profiles="every_size")
    with pytest.raises(ValueError, match="batch_profiles: must be one of powers_of_two, every_size"):
        RuntimeConfig(batch_profiles="fibonacci")


def test_with_a_profile_for_every_size_a_batch_of_three_runs_in_its_own_and_equals_each_alone(rng):
    """`batch_profiles: every_size`: profiles 1, 2 and 3 captured ahead; a batch of 3 runs in the profile
    of 3 (not 4), and each member's chunk equals the eager reference's for it alone."""
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=3, batch_profiles="every_size"))
    reference = EagerPolicy(parts=parts)
    with PipelinedExecutor(parts=parts) as executor:
        assert {p["batch"] for p in executor.report()["profiles"]} == {1, 2, 3}
        assert [executor.batch_profile(n) for n in (1, 2, 3)] == [1, 2, 3]
        cfg = executor.config.model
        observations = [random_observation(rng, "pi05_tiny") for _ in range(3)]
        noises = [
            rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32) for _ in range(3)
        ]
        futures = executor.submit_batch(observations, noises)
        for obs, noise, future in zip(observations, noises, futures, strict=True):
            np.testing.assert_allclose(
                future.result(timeout=120).actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5
            )
        # the batch ran in the profile of 3, captured ahead (a profile of 4 would have been built for it)
        assert {p["batch"] for p in executor.report()["profiles"]} == {1, 2, 3}
        # and the server batches by the executor's profiles: its device times are per profile of 3
        with PolicyServer(executor) as server:
            assert server.batching.profile_of(3) == 3


@pytest.fixture(scope="module", params=["switch", "rtc"])
def batched(request):
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=4, handover=request.param))
    with PipelinedExecutor(parts=parts) as executor:
        yield executor, EagerPolicy(parts=parts)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_a_batch_equals_each_member_alone(batched, rng, n):
    executor, reference = batched
    cfg, config = executor.config.model, executor.config
    optional = config.optional_camera_names[0]
    members = []
    for i in range(n):
        obs = random_observation(rng, "pi05_tiny", skip=(optional,) if i % 2 else ())
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        old = rng.uniform(-1, 1, (cfg.chunk_length, config.robot_action_dim)).astype(np.float32)
        members.append((obs, noise, PreviousChunk(old, int(rng.integers(0, 4))) if i % 3 else None))
    observations, noises, previous = map(list, zip(*members, strict=True))
    futures = executor.submit_batch(observations, noises, previous=previous)
    assert {p["batch"] for p in executor.report()["profiles"]} == {1, 2, 4}  # captured ahead, each
    for (obs, noise, previous), future in zip(members, futures, strict=True):
        chunk = future.result(timeout=120)
        want = reference.infer(obs, noise, previous)
        assert chunk.timestamp == obs.timestamp and chunk.frozen_steps == want.frozen_steps
        np.testing.assert_allclose(chunk.actions, want.actions, rtol=1e-4, atol=1e-5)


def test_a_bad_member_is_named_and_nothing_is_queued(batched, rng):
    executor, _ = batched
    good = random_observation(rng, "pi05_tiny")
    bad = random_observation(rng, "pi05_tiny")
    bad.state = np.full(8, np.nan, np.float32)
    submitted = executor.counters["submitted"]
    with pytest.raises(ValueError, match=r"observations\[1\]: state: non-finite"):
        executor.submit_batch([good, bad])
    with pytest.raises(ValueError, match="observations: 5 in one batch"):
        executor.submit_batch([good] * 5)
    assert executor.counters["submitted"] == submitted
    assert executor.submit_batch([good, good])[1].result(timeout=120).actions.shape[0] > 0
