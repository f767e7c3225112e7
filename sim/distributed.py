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
from .evaluate import check_servers, check_tasks_and_trials, deal_episodes
from .launcher import ENV_VAR, ActorFailed, libero_python
from .report import EpisodeResult

FORWARDED_ENV = ("MUJOCO_GL",)  # what the simulator actors need from the driver, besides LIBERO's python
ACTOR_START_TIMEOUT_S = 600.0  # a policy server loads and captures its model within this


def encode_request(
    obs: Observation, previous: PreviousChunk | None, noise: np.ndarray | None = None
) -> bytes:
    message = {
        "images": obs.images,
        "state": np.asarray(obs.state, dtype=np.float32),
        "instruction": obs.instruction,
        "timestamp": float(obs.timestamp),
    }
    if previous is not None:
        message["previous"] = {"actions": previous.actions, "delay_steps": int(previous.delay_steps)}
    if noise is not None:
        message["noise"] = np.asarray(noise, dtype=np.float32)
    return protocol.encode(message)


def decode_request(payload: bytes) -> tuple[Observation, PreviousChunk | None, np.ndarray | None]:
    m = protocol.decode(payload)
    obs = Observation(m["images"], m["state"], m["instruction"], m["timestamp"])
    p = m.get("previous")
    return obs, (PreviousChunk(p["actions"], p["delay_steps"]) if p else None), m.get("noise")


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
        self.executor = self.server = None
        try:
            self.executor = PipelinedExecutor(config)
        except ValueError as err:  # the user's mistake (a checkpoint, a setting): named by the driver
            self.mistake = str(err)
            return
        self.mistake = None
        self.server = PolicyServer(self.executor)

    def identity(self) -> dict:
        """The served model; {"mistake": why} where the configuration was refused."""
        if self.mistake is not None:
            return {"mistake": self.mistake}
        meta = self.executor.metadata
        return {
            "model_id": meta.model_id,
            "random_weights": meta.random_weights,
            "noise_shape": list(meta.noise_shape),
        }

    def infer(self, robot: str, request: bytes) -> bytes:
        obs, previous, noise = decode_request(request)
        return encode_chunk(self.server.submit(robot, obs, previous=previous, noise=noise).result())

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.executor.close()


class RemotePolicy:
    """The policy interface `InProcessLink` drives, served by a `PolicyActor` as robot `robot`."""

    def __init__(self, actor, robot: str):
        self.actor, self.robot = actor, robot

    def submit(self, obs: Observation, noise=None, previous: PreviousChunk | None = None) -> Future:
        answer: Future = Future()
        reply = self.actor.infer.remote(self.robot, encode_request(obs, previous, noise)).future()

        def done(f: Future) -> None:
            try:
                answer.set_result(decode_chunk(f.result()))
            except BaseException as err:  # noqa: BLE001 - handed to the episode loop
                answer.set_exception(getattr(err, "cause", None) or err)  # a RayTaskError's original

        reply.add_done_callback(done)
        return answer

    def reset(self) -> None:
        """Nothing of a robot's stays in the server between episodes but its counters."""


@ray.remote(num_cpus=1, max_concurrency=2)  # `close` can run while `run` is busy
class SimWorker:
    """One LIBERO simulator (its sim server process on this actor's node) and the episodes dealt to it."""

    def __init__(self, log_dir: str):
        from .client import SimClient
        from .launcher import SimServerProcess

        os.makedirs(log_dir, exist_ok=True)  # on this actor's node
        log = Path(log_dir) / f"sim_server_{socket.gethostname()}_{os.getpid()}.log"
        self.sim = SimServerProcess(log_path=log)
        self.client = SimClient(self.sim.endpoint, server_gone=self.sim.exit_reason)

    def tasks(self, suite: str) -> list[dict]:
        return self.client.tasks(suite)

    def build(self, suite: str, task: int, trial: int, seed: int) -> None:
        """The first episode's environment, built while the policy servers load (as EnvironmentBuilds)."""
        self.client.reset(suite, task, max(trial - 1, 0), seed, 0)

    def run(self, policy, robot: str, suite: str, jobs: list[tuple[int, int]], run: dict) -> list[dict]:
        noise_shape = ray.get(policy.identity.remote())["noise_shape"]
        link = InProcessLink(RemotePolicy(policy, robot), lockstep=True, noise_shape=noise_shape)
        return [dataclasses.asdict(run_episode(self.client, link, suite, t, i, **run)) for t, i in jobs]

    def close(self) -> None:
        """The sim server stopped. The client's socket is left to the actor's end (stop() kills it): `run`
        may still be using it on the other thread, and a ZeroMQ socket must not be closed from another."""
        self.sim.stop()


def connect(address: str, workers: int, servers: int = 1) -> None:
    """`local`: a Ray instance on this machine (a CPU for each simulator and policy server); otherwise a
    cluster's address (`auto`, `ray://host:10001`, `host:6379`). The dashboard stays off. The LIBERO
    interpreter is resolved here, on the driver, and handed to the actors as an absolute path (an actor's
    working directory is wherever its node's Ray was started)."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    # absolute, links kept (a virtual environment's python is a link to the base interpreter)
    env[ENV_VAR] = os.path.abspath(libero_python())  # ValueError naming it when there is none here
    runtime_env = {"env_vars": env}
    if address == "local":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance reports nothing home
        ray.init(
            address="local",  # a new instance, even where RAY_ADDRESS names a cluster
            num_cpus=workers + servers,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
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


def check_resources(workers: int, servers: int, gpus_each: int) -> None:
    """What the cluster cannot give is named now: Ray would leave such an actor pending for ever."""
    check_servers(workers, servers)
    have = ray.cluster_resources()
    if servers * gpus_each > have.get("GPU", 0):
        raise ValueError(
            f"--servers: {servers} policy servers on CUDA need {servers * gpus_each} GPUs; the Ray cluster "
            f"has {have.get('GPU', 0):.0f} (or run them with --device cpu)"
        )
    if workers + servers > have.get("CPU", 0):
        raise ValueError(
            f"--workers: {workers} simulators and {servers} policy servers need a CPU each; the Ray "
            f"cluster has {have.get('CPU', 0):.0f}"
        )


def stop(sims: list, policies: list) -> None:
    """Each actor's sim server stopped and executor closed, each on its own (one that died or hangs
    does not keep the others from closing); then every actor ended."""
    closing = {actor.close.remote(): actor for actor in [*sims, *policies]}
    ready, _ = ray.wait(list(closing), num_returns=len(closing), timeout=60)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            pass  # it died; its sim server dies with it (SimServerProcess: parent-death signal)
    for actor in closing.values():
        ray.kill(actor)


def evaluate_ray(
    config: RuntimeConfig,
    workers: int,
    servers: int,
    suite: str,
    tasks: list[int] | None,
    trials: int,
    log_dir: str,
    before_start=None,
    **run,
) -> tuple[list[EpisodeResult], float, dict]:
    """`tasks` x `trials` episodes over `workers` simulators and `servers` policy servers (worker w is
    robot `worker_w` of server w mod `servers`), on the connected Ray cluster. Returns the episodes in
    task/trial order, the wall-clock seconds they took, and the served model's identity. `before_start()`
    runs once the request has passed its checks (eval-libero clears an earlier report there)."""
    gpu = 1 if config.device.startswith("cuda") else 0
    check_resources(workers, servers, gpu)
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(RuntimeConfig)}
    concurrency = max(1, -(-workers // servers)) + 1  # every robot of a server blocks in `infer` at once
    policies = [
        PolicyActor.options(num_cpus=1, num_gpus=gpu, max_concurrency=concurrency).remote(settings)
        for _ in range(servers)
    ]
    sims = [SimWorker.remote(log_dir) for _ in range(workers)]
    try:
        known = ray.get(sims[0].tasks.remote(suite), timeout=ACTOR_START_TIMEOUT_S)
        check_tasks_and_trials(known, suite, tasks, trials)  # as without Ray, before any episode
        tasks = [t["index"] for t in known] if tasks is None else tasks
        dealt = deal_episodes(tasks, trials, workers)
        builds = [
            sim.build.remote(suite, *share[0], run["seed"])
            for sim, share in zip(sims, dealt, strict=True)
            if share
        ]
        # every server up and every first environment built before the clock starts
        identities = ray.get([p.identity.remote() for p in policies], timeout=ACTOR_START_TIMEOUT_S)
        identity = identities[0]
        if "mistake" in identity:
            raise ValueError(identity["mistake"])
        if before_start is not None:
            before_start()  # the request and the model passed their checks
        ray.get(builds, timeout=ACTOR_START_TIMEOUT_S)
        start = time.monotonic()
        refs = [
            sim.run.remote(policies[w % servers], f"worker_{w}", suite, dealt[w], run)
            for w, sim in enumerate(sims)
        ]
        episodes = ray.get(refs)
        seconds = time.monotonic() - start
    except ray.exceptions.RayTaskError as err:
        raise err.cause if err.cause is not None else err from None
    except ray.exceptions.RayActorError as err:  # an actor died starting (its own error inside)
        raise ActorFailed(f"--ray: an actor failed: {err}") from None
    except ray.exceptions.GetTimeoutError:
        raise ActorFailed(
            f"--ray: the actors did not start within {ACTOR_START_TIMEOUT_S:.0f} s (is a resource missing?)"
        ) from None
    finally:
        stop(sims, policies)
    results = {}
    for share, fields_of_share in zip(dealt, episodes, strict=True):
        for job, fields in zip(share, fields_of_share, strict=True):
            results[job] = EpisodeResult(**fields)
    return [results[job] for share in dealt for job in share], seconds, identity
