"""Parallel LIBERO evaluation over several machines, with Ray (`eval-libero --workers N --ray ADDRESS`).

Ray's actors own the processes: a `PolicyActor` per policy server (a batched `PolicyServer` over one
executor, on a GPU when the cluster has one) and a `SimWorker` per simulator (it starts a LIBERO sim
server in that node's LIBERO environment and runs its share of the episodes). Each worker is a robot of
one policy server; the episode loop is the same `run_episode` as on one machine, in lockstep, its link an
`InProcessLink` whose policy is the remote server (`RemotePolicy`). Observations and chunks cross the
cluster as msgpack (sim/protocol.py's codec), not as pickled Python objects.

Only this module imports Ray; the single-machine path (`--workers N` without `--ray`) never does. Every
node needs this package installed and, where simulators run, the LIBERO environment at the same path
(`VLA_LIBERO_PYTHON`, passed on to the actors).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import ray

from ..runtime.config import RuntimeConfig
from ..runtime.handover import PreviousChunk
from ..runtime.types import ActionChunk, Observation
from . import protocol
from .episode import InProcessLink, run_episode
from .report import EpisodeResult

FORWARDED_ENV = ("VLA_LIBERO_PYTHON", "MUJOCO_GL")  # what the simulator actors need from the driver


def encode_request(obs: Observation, previous: PreviousChunk | None) -> bytes:
    message = {
        "images": obs.images,
        "state": np.asarray(obs.state, dtype=np.float32),
        "instruction": obs.instruction,
        "timestamp": float(obs.timestamp),
    }
    if previous is not None:
        message["previous"] = {"actions": previous.actions, "delay_steps": int(previous.delay_steps)}
    return protocol.encode(message)


def decode_request(payload: bytes) -> tuple[Observation, PreviousChunk | None]:
    m = protocol.decode(payload)
    obs = Observation(m["images"], m["state"], m["instruction"], m["timestamp"])
    p = m.get("previous")
    return obs, (PreviousChunk(p["actions"], p["delay_steps"]) if p else None)


def encode_chunk(chunk: ActionChunk) -> bytes:
    fields = {f.name: getattr(chunk, f.name) for f in dataclasses.fields(ActionChunk)}
    return protocol.encode({**fields, "actions": np.asarray(chunk.actions, dtype=np.float32)})


def decode_chunk(payload: bytes) -> ActionChunk:
    m = protocol.decode(payload)
    return ActionChunk(**{f.name: m[f.name] for f in dataclasses.fields(ActionChunk) if f.name in m})


@ray.remote
class PolicyActor:
    """One batched policy server; its robots' requests arrive concurrently (a threaded actor), so the
    server batches them as it does for threads in one process."""

    def __init__(self, settings: dict):
        from ..runtime.executor import PipelinedExecutor
        from ..runtime.server import PolicyServer

        config = RuntimeConfig(**settings)
        if config.device.startswith("cuda"):
            config = config.replace(device="cuda")  # Ray gives the actor its GPU as the only visible one
        self.executor = PipelinedExecutor(config)
        self.server = PolicyServer(self.executor)

    def identity(self) -> dict:
        meta = self.executor.metadata
        return {"model_id": meta.model_id, "random_weights": meta.random_weights}

    def infer(self, robot: str, request: bytes) -> bytes:
        obs, previous = decode_request(request)
        return encode_chunk(self.server.submit(robot, obs, previous=previous).result())

    def close(self) -> None:
        self.server.close()
        self.executor.close()


class RemotePolicy:
    """The policy interface `InProcessLink` drives, served by a `PolicyActor` as robot `robot`."""

    def __init__(self, actor, robot: str):
        self.actor, self.robot = actor, robot

    def submit(self, obs: Observation, previous: PreviousChunk | None = None) -> Future:
        answer: Future = Future()
        reply = self.actor.infer.remote(self.robot, encode_request(obs, previous)).future()

        def done(f: Future) -> None:
            try:
                answer.set_result(decode_chunk(f.result()))
            except BaseException as err:  # noqa: BLE001 - handed to the episode loop
                answer.set_exception(getattr(err, "cause", None) or err)  # a RayTaskError's original

        reply.add_done_callback(done)
        return answer

    def reset(self) -> None:
        """Nothing of a robot's stays in the server between episodes but its counters."""


@ray.remote(num_cpus=1)
class SimWorker:
    """One LIBERO simulator (its sim server process on this actor's node) and the episodes dealt to it."""

    def __init__(self, log_dir: str):
        from .client import SimClient
        from .launcher import SimServerProcess

        os.makedirs(log_dir, exist_ok=True)  # on this actor's node
        log = Path(log_dir) / f"sim_server_{socket.gethostname()}_{os.getpid()}.log"
        self.sim = SimServerProcess(log_path=log)
        self.client = SimClient(self.sim.endpoint)

    def task_indices(self, suite: str) -> list[int]:
        return [t["index"] for t in self.client.tasks(suite)]

    def run(self, policy, robot: str, suite: str, jobs: list[tuple[int, int]], run: dict) -> list[dict]:
        link = InProcessLink(RemotePolicy(policy, robot), lockstep=True)
        return [dataclasses.asdict(run_episode(self.client, link, suite, t, i, **run)) for t, i in jobs]

    def close(self) -> None:
        self.client.close()
        self.sim.stop()


def connect(address: str, workers: int) -> None:
    """`local`: a Ray instance on this machine (enough CPUs for the workers); otherwise a cluster's
    address (`auto`, `ray://host:10001`, `host:6379`). The dashboard stays off."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if address == "local":
        ray.init(num_cpus=workers + 1, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        return
    if address != "auto":
        check_reachable(address)
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A cluster address (HOST:PORT or ray://HOST:PORT) that nothing answers at is named at once: Ray
    itself retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not local, auto, HOST:PORT or ray://HOST:PORT: {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port} ({err.strerror or err})") from None


def evaluate_ray(
    config: RuntimeConfig,
    workers: int,
    servers: int,
    suite: str,
    tasks: list[int] | None,
    trials: int,
    log_dir: str,
    **run,
) -> tuple[list[EpisodeResult], float, dict]:
    """`tasks` x `trials` episodes over `workers` simulators and `servers` policy servers (worker w is
    robot `worker_w` of server w mod `servers`), on the connected Ray cluster. Returns the episodes in
    task/trial order, the wall-clock seconds they took, and the served model's identity."""
    gpu = 1 if config.device.startswith("cuda") else 0
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(RuntimeConfig)}
    concurrency = max(1, -(-workers // servers)) + 1  # every robot of a server blocks in `infer` at once
    policies = [
        PolicyActor.options(num_gpus=gpu, max_concurrency=concurrency).remote(settings)
        for _ in range(servers)
    ]
    sims = [SimWorker.remote(log_dir) for _ in range(workers)]
    try:
        known = ray.get(sims[0].task_indices.remote(suite))
        bad = [t for t in tasks or () if t not in known]
        if bad:
            raise ValueError(f"--tasks: {bad} out of range 0..{len(known) - 1} for {suite}")
        tasks = known if tasks is None else tasks
        identity = ray.get(policies[0].identity.remote())
        ray.get([p.identity.remote() for p in policies[1:]])  # every server up before the clock starts
        jobs = [(task, trial) for task in tasks for trial in range(trials)]
        start = time.monotonic()
        refs = [
            sim.run.remote(policies[w % servers], f"worker_{w}", suite, jobs[w::workers], run)
            for w, sim in enumerate(sims)
        ]
        shares = ray.get(refs)
        seconds = time.monotonic() - start
    except ray.exceptions.RayTaskError as err:
        raise err.cause if err.cause is not None else err from None
    finally:
        actors = [*sims, *policies]
        try:  # the sim servers stopped, the executors closed; then the actors ended whatever state
            ray.get([a.close.remote() for a in actors], timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        for actor in actors:
            ray.kill(actor)
    results = {}
    for w, share in enumerate(shares):
        for job, fields in zip(jobs[w::workers], share, strict=True):
            results[job] = EpisodeResult(**fields)
    return [results[job] for job in jobs], seconds, identity
