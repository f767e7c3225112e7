"""`vla-runtime eval-libero`: closed-loop LIBERO episodes over any PolicyLink (in-process or ROS), with a
progress bar over episodes and a progress line within each; `evaluate_parallel` runs several simulators
at once, each worker a robot of one batched policy server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .episode import InProcessLink, PolicyLink, run_episode
from .report import DEADLINE_MS, EpisodeResult


def evaluate(
    client,
    link: PolicyLink,
    suite: str,
    tasks: list[int] | None,
    trials: int,
    *,
    max_steps: int | None,
    replan_steps: int,
    seed: int,
    delay_steps: int = 0,
    settle_steps: int,
    video_dir: Path | None,
) -> tuple[list[EpisodeResult], float]:
    """The episodes one after another, and the wall-clock seconds they took (from the first reset: the
    policy's start-up before it is not theirs, as in `evaluate_parallel`)."""
    if tasks is None:
        tasks = [t["index"] for t in client.tasks(suite)]
    episodes = []
    start = time.monotonic()
    with tqdm(total=len(tasks) * trials, desc=f"{suite} ({link.path})", unit="episode") as bar:
        for task in tasks:
            for trial in range(trials):
                with tqdm(desc=f"  task {task} init {trial}", unit="step", leave=False) as steps:

                    def progress(result: EpisodeResult, steps=steps) -> None:
                        steps.update()
                        if result.chunk_age_ms:
                            steps.set_postfix(
                                age_p50_ms=f"{np.median(result.chunk_age_ms):.1f}",
                                chunks=result.chunks,
                                late_so_far=sum(a > DEADLINE_MS for a in result.chunk_age_ms),
                            )

                    episodes.append(
                        run_episode(
                            client,
                            link,
                            suite,
                            task,
                            trial,
                            max_steps=max_steps,
                            replan_steps=replan_steps,
                            delay_steps=delay_steps,
                            seed=seed,
                            settle_steps=settle_steps,
                            video_dir=video_dir,
                            progress=progress,
                        )
                    )
                bar.set_postfix(success=sum(e.success for e in episodes))
                bar.update()
    return episodes, time.monotonic() - start


def check_servers(workers: int, servers: int) -> None:
    """At most one policy server per simulator worker (a server without a worker would serve nobody)."""
    if servers > workers:
        raise ValueError(f"--servers: {servers} policy servers for {workers} workers; at most one per worker")


def check_tasks_and_trials(known_tasks: list[dict], suite: str, tasks: list[int] | None, trials: int | None):
    """The tasks exist in the suite (`known_tasks`: the sim server's list) and each has an init state per
    trial; ValueError names --tasks or --trials."""
    count = len(known_tasks)
    bad = [t for t in tasks or () if t >= count]
    if bad:
        raise ValueError(f"--tasks: {bad} out of range 0..{count - 1} for {suite}")
    chosen = [known_tasks[t] for t in tasks] if tasks else known_tasks
    fewest = min((t["init_states"] for t in chosen if "init_states" in t), default=None)
    if trials is not None and fewest is not None and trials > fewest:
        raise ValueError(f"--trials: {trials}, but {suite} has {fewest} init states for some chosen task")


def deal_episodes(tasks: list[int], trials: int, workers: int) -> list[list[tuple[int, int]]]:
    """The episodes (task, trial), task by task, cut into `workers` consecutive shares whose sizes differ
    by at most one. A simulator rebuilds its LIBERO environment whenever the task changes (seconds of
    MuJoCo model compilation), so consecutive trials of one task stay on one worker: each worker builds
    the tasks its share spans (10 tasks x 50 trials on 8 workers: 17 builds; dealt round-robin, 80, and
    one per episode when a task has no more trials than there are workers). Static, so a worker (a robot,
    with its own noise) runs the same episodes every time; the price: episodes that end early on success
    shorten some shares more than others, which round-robin evened out."""
    jobs = [(task, trial) for task in tasks for trial in range(trials)]
    share, extra = divmod(len(jobs), workers)
    bounds = [w * share + min(w, extra) for w in range(workers + 1)]
    return [jobs[bounds[w] : bounds[w + 1]] for w in range(workers)]


class EnvironmentBuilds:
    """Each simulator builds the environment of its first episode's task in the background, while the
    policy loads and captures. A LIBERO build takes about a second alone on the H200 machine, but builds
    started together wait for each other (by inference from the resets' times, about 7.5 s each with 16
    at once), and every worker starts with one. The build's reset draws the scene just before the first
    episode's (its trial less one), so that episode's reset need not move the scene forward
    (LiberoSim._draw_scene). Each build talks over a connection of its own (`connect(endpoint)`, closed
    in its thread), so no ZeroMQ socket is ever shared between threads. `wait()` before the episodes;
    errors are raised there, as the first reset would have raised them."""

    def __init__(
        self, endpoints: list[str], suite: str, first_episodes: list[tuple[int, int]], seed: int, connect=None
    ):
        from .client import SimClient  # noqa: PLC0415 - pyzmq only where simulators are used

        connect = connect or SimClient
        self._errors: list[BaseException] = []

        def build(endpoint: str, task: int, trial: int) -> None:
            client = None
            try:
                client = connect(endpoint)
                # no settle steps: the episode's own reset settles
                client.reset(suite, task, max(trial - 1, 0), seed, 0)
            except BaseException as err:  # noqa: BLE001 - raised by wait()
                self._errors.append(err)
            finally:
                if client is not None:
                    client.close()

        self._threads = [
            threading.Thread(target=build, args=(endpoint, *first), name=f"build-{w}", daemon=True)
            # idle workers (more workers than episodes) have no first episode
            for w, (endpoint, first) in enumerate(zip(endpoints, first_episodes, strict=False))
        ]
        for t in self._threads:
            t.start()

    def wait(self) -> None:
        for t in self._threads:
            t.join()
        if self._errors:
            raise self._errors[0]


def evaluate_parallel(
    clients: list,
    server,
    suite: str,
    tasks: list[int],
    trials: int,
    **run,
) -> tuple[list[EpisodeResult], float]:
    """The episodes of `tasks` x `trials`, dealt to one worker per simulator client (`deal_episodes`), each
    worker a robot of `server` (runtime.server.PolicyServer, in lockstep on its own simulation clock).
    Returns the episodes in task/trial order and the wall-clock seconds they took. The first failure (or
    Ctrl-C) stops every worker at its next episode; the workers are joined before anything is closed."""
    shares = deal_episodes(tasks, trials, len(clients))
    results: dict[tuple[int, int], EpisodeResult] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    bar = tqdm(total=sum(map(len, shares)), desc=f"{suite} ({len(clients)} workers)", unit="episode")
    lock = threading.Lock()

    def worker(w: int) -> None:
        link = InProcessLink(server.session(f"worker_{w}"), lockstep=True)
        try:
            for task, trial in shares[w]:
                if stop.is_set():
                    return
                result = run_episode(clients[w], link, suite, task, trial, **run)
                with lock:
                    results[(task, trial)] = result
                    bar.update()
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(err)
            stop.set()

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), name=f"eval-{w}") for w in range(len(clients))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stop.set()  # each worker ends its episode, then stops; joined before the clients are closed
        for t in threads:
            t.join()
        raise
    finally:
        bar.close()
    if errors:
        raise errors[0]
    return [results[job] for share in shares for job in share], time.monotonic() - start
