"""Parallel LIBERO evaluation with Ray (sim/distributed.py): the messages round-trip as msgpack; the same
episodes run as Ray actors (a local Ray instance, `eval-libero --ray local`) give the same results as the
threads of one process (`--workers` alone), action for action; mistakes are named. Needs `make libero`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.handover import PreviousChunk
from vla_runtime.runtime.server import PolicyServer
from vla_runtime.runtime.types import ActionChunk
from vla_runtime.sim.client import SimClient
from vla_runtime.sim.distributed import decode_chunk, decode_request, encode_chunk, encode_request
from vla_runtime.sim.episode import InProcessLink
from vla_runtime.sim.evaluate import evaluate, evaluate_parallel
from vla_runtime.sim.launcher import SimServerProcess

from ..conftest import random_observation

CLI = str(Path(sys.executable).parent / "vla-runtime")
SUITE = "libero_spatial"
EPISODES = dict(max_steps=10, settle_steps=1, replan_steps=5, seed=7)


def test_requests_and_chunks_round_trip(rng):
    obs = random_observation(rng, "pi05_tiny")
    previous = PreviousChunk(rng.standard_normal((10, 7)).astype(np.float32), 3)
    noise = rng.standard_normal((10, 32)).astype(np.float32)
    for prev, sent_noise in ((None, None), (previous, noise)):
        got, got_previous, got_noise = decode_request(encode_request(obs, prev, sent_noise))
        if sent_noise is None:
            assert got_noise is None
        else:
            np.testing.assert_array_equal(got_noise, sent_noise)
        assert got.instruction == obs.instruction and got.timestamp == obs.timestamp
        np.testing.assert_array_equal(got.state, obs.state)
        assert set(got.images) == set(obs.images)
        for name, image in obs.images.items():
            np.testing.assert_array_equal(got.images[name], image)
        if prev is None:
            assert got_previous is None
        else:
            np.testing.assert_array_equal(got_previous.actions, prev.actions)
            assert got_previous.delay_steps == prev.delay_steps
    chunk = ActionChunk(rng.standard_normal((10, 7)).astype(np.float32), 1.5, {"total": 3.0}, 10, "m", True)
    back = decode_chunk(encode_chunk(chunk))
    np.testing.assert_array_equal(back.actions, chunk.actions)
    assert back.summary() == chunk.summary()


def threaded_reference(tasks: list[int], workers: int) -> list[dict]:
    """The same episodes on threads of this process: evaluate_parallel over one batched server."""
    sims = [SimServerProcess() for _ in range(workers)]
    clients = [SimClient(sim.endpoint) for sim in sims]
    try:
        config = RuntimeConfig(preset="pi05_tiny", max_batch=2, seed=7)  # eval-libero's default seed
        with PipelinedExecutor(config) as executor, PolicyServer(executor) as server:
            episodes, _ = evaluate_parallel(clients, server, SUITE, tasks, 1, video_dir=None, **EPISODES)
    finally:
        for client in clients:
            client.close()
        for sim in sims:
            sim.stop()
    return [e.summary() for e in episodes]


def sequential_reference(tasks: list[int]) -> list[dict]:
    """The same episodes one after another, the executor alone (batch 1), as eval-libero without
    --workers runs them."""
    sim = SimServerProcess()
    client = SimClient(sim.endpoint)
    try:
        with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", seed=7)) as executor:
            link = InProcessLink(executor, lockstep=True)
            episodes, _ = evaluate(client, link, SUITE, tasks, 1, video_dir=None, **EPISODES)
    finally:
        client.close()
        sim.stop()
    return [e.summary() for e in episodes]


def test_an_episodes_actions_do_not_depend_on_the_workers_or_the_path():
    """Each episode's noise follows from the run's seed and the episode alone (before, from a robot's
    stream that went on across its episodes): two workers, one worker and the sequential loop execute the
    same actions, episode for episode."""
    runs = {
        "two workers": threaded_reference([0, 1], workers=2),
        "one worker": threaded_reference([0, 1], workers=1),
        "sequential": sequential_reference([0, 1]),
    }
    want = runs.pop("two workers")
    for name, got in runs.items():
        for a, b in zip(got, want, strict=True):
            assert (a["task"], a["init_state"], a["chunks"]) == (b["task"], b["init_state"], b["chunks"])
            assert a["step_sizes"] == pytest.approx(b["step_sizes"], rel=1e-5), name


def test_ray_actors_run_the_same_episodes_as_threads(tmp_path):
    """Two simulators and two policy servers as actors of a local Ray instance (each server holds a CPU:
    the instance has one for each actor; it had one too few, and a simulator never started); the
    episodes are the threads' over one server, action for action (the noise is each episode's)."""
    run = subprocess.run(
        [CLI, "eval-libero", "--preset", "pi05_tiny", "--suite", SUITE, "--tasks", "0,1", "--trials", "1"]
        + ["--max-steps", "10", "--settle-steps", "1", "--workers", "2", "--servers", "2", "--ray", "local"]
        + ["--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2 and summary["ray"] == "local" and summary["workers"] == 2
    over_ray = json.loads((tmp_path / "results.json").read_text())["episodes"]
    threads = threaded_reference([0, 1], workers=2)
    assert len(over_ray) == len(threads) == 2
    for got, want in zip(over_ray, threads, strict=True):
        for key in ("task", "init_state", "steps", "success", "success_per_step", "chunks", "late_actions"):
            assert got[key] == want[key], key
        # the executed actions' step sizes: the same actions, chunk for chunk (same robots, same noise)
        assert got["step_sizes"] == pytest.approx(want["step_sizes"], rel=1e-5)
        assert got["chunks"] == 2  # 10 steps, a chunk every 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--servers", "2"], "--servers: several policy servers run as Ray actors; add --ray"),
        (["--ray", "local", "--path", "ros"], "--ray: parallel episodes run in-process and in lockstep"),
        (["--ray", "127.0.0.1:1"], "--ray: cannot connect to '127.0.0.1:1'"),
        # named by the actors before any episode, as without Ray, and the earlier report kept
        (["--ray", "local", "--workers", "2", "--trials", "60"], "--trials: 60, but libero_spatial has 50"),
        (["--ray", "local", "--workers", "2", "--tasks", "99"], "--tasks: [99] out of range"),
        (["--ray", "local", "--workers", "2", "--checkpoint", "CHECKPOINT"], "norm"),
    ],
)
def test_ray_mistakes_are_named(tmp_path, args, message):
    if "CHECKPOINT" in args:  # a checkpoint without its normalisation statistics: refused by the actor
        from vla_runtime.graphs.config import get_preset
        from vla_runtime.graphs.weights import build_model, save_checkpoint

        checkpoint = save_checkpoint(
            build_model(get_preset("pi05_tiny"), seed=1), tmp_path / "ckpt", "openpi", "lm_head"
        )
        args = [str(checkpoint) if a == "CHECKPOINT" else a for a in args]
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier run's")
    run = subprocess.run(
        [CLI, "eval-libero", "--preset", "pi05_tiny", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert (out / "report.md").read_text() == "an earlier run's"
