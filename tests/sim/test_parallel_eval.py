"""`eval-libero --workers` without LIBERO: how the episodes are dealt (every episode once, in task/trial
order, shares within one of each other, each worker's trials of a task consecutive: one LIBERO environment
build each) and the limits named on the command line."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from vla_runtime.sim.evaluate import deal_episodes
from vla_runtime.sim.launcher import usable_cpus

CLI = str(Path(sys.executable).parent / "vla-runtime")


def environment_builds(share: list[tuple[int, int]]) -> int:
    """How often a simulator running `share` in order rebuilds its environment: at each change of task."""
    return sum(1 for k, (task, _) in enumerate(share) if k == 0 or share[k - 1][0] != task)


@pytest.mark.parametrize("seed", range(20))
def test_every_episode_once_in_order_with_few_environment_builds(seed):
    rng = random.Random(seed)
    tasks = sorted(rng.sample(range(10), rng.randint(1, 10)))
    trials, workers = rng.randint(1, 50), rng.randint(1, 8)
    shares = deal_episodes(tasks, trials, workers)
    assert len(shares) == workers
    assert [job for share in shares for job in share] == [(t, i) for t in tasks for i in range(trials)]
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    # a cut between two shares splits at most one task: at most tasks + workers - 1 builds in all
    assert sum(map(environment_builds, shares)) <= len(tasks) + workers - 1


def test_more_workers_than_episodes_leaves_some_idle():
    shares = deal_episodes([3], 2, 4)
    assert shares == [[(3, 0)], [(3, 1)], [], []]


def test_fifty_trials_of_ten_tasks_on_eight_workers():
    """LIBERO's protocol, 500 episodes: 17 builds (10 tasks, 7 of them cut between two workers), against 80
    when the episodes were dealt round-robin (and one per episode when a task had no more trials than
    there were workers)."""
    shares = deal_episodes(list(range(10)), 50, 8)
    assert sum(map(environment_builds, shares)) == 17
    jobs = [(t, i) for t in range(10) for i in range(50)]
    assert sum(environment_builds(jobs[w::8]) for w in range(8)) == 80


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", str(usable_cpus() + 1)], f"--workers: at most the {usable_cpus()} CPUs this process"),
        (["--workers", str(usable_cpus() + 1), "--ray", "local"], "--workers: at most the"),
        (["--tasks", "0,1,0"], "a task index twice in 0,1,0; use --trials"),
    ],
)
def test_mistakes_are_named_before_anything_starts(tmp_path, args, message):
    env = {**os.environ, "VLA_LIBERO_PYTHON": "/nonexistent"}  # refused before any simulator is needed
    run = subprocess.run(
        [CLI, "eval-libero", "--preset", "pi05_tiny", *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_one_worker_counts_the_episodes_time_alone(monkeypatch):
    """The speed-up of --workers N is against one worker's episodes per hour: both clocks start at the
    first episode (a policy's start-up before it, here 100 s on a fake clock, is not the episodes'; it
    once was for one worker, which overstated the speed-up)."""
    from types import SimpleNamespace

    from vla_runtime.sim import evaluate as evaluation

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(evaluation, "time", SimpleNamespace(monotonic=lambda: clock.now))

    def episode(client, link, suite, task, trial, **run):
        clock.now += 10.0 + task  # 10 s, plus the task index to tell episodes apart
        return SimpleNamespace(success=False, task=task, trial=trial)

    monkeypatch.setattr(evaluation, "run_episode", episode)
    run = dict(max_steps=1, replan_steps=1, seed=0, settle_steps=0, video_dir=None)
    episodes, seconds = evaluation.evaluate(None, SimpleNamespace(path="fake"), "suite", [0, 2], 3, **run)
    assert [(e.task, e.trial) for e in episodes] == [(t, i) for t in (0, 2) for i in range(3)]
    assert seconds == 3 * 10.0 + 3 * 12.0


def test_simulators_build_their_first_tasks_in_the_background():
    """Each simulator gets one reset of its first episode's task (the scene before its trial's, no settle
    steps), all at once, each over a connection of its own that is closed after; `wait` returns when all
    are done and raises a simulator's error as the first episode would have."""
    import threading

    from vla_runtime.sim.client import SimError
    from vla_runtime.sim.evaluate import EnvironmentBuilds

    started = threading.Barrier(3, timeout=30)  # all three build at once, or this times out
    connections = []

    class Connection:
        def __init__(self, endpoint):
            self.endpoint, self.resets, self.closed = endpoint, [], False
            self.threads = {threading.get_ident()}  # where it is made, used and closed
            connections.append(self)

        def reset(self, *args):
            self.threads.add(threading.get_ident())
            started.wait()
            self.resets.append(args)
            if self.endpoint == "tcp://failing":
                raise SimError("task: 9 out of range")

        def close(self):
            self.threads.add(threading.get_ident())
            self.closed = True

    def by_endpoint():
        return sorted(connections, key=lambda c: c.endpoint)

    main = threading.get_ident()
    endpoints = ["tcp://a", "tcp://b", "tcp://c"]
    builds = EnvironmentBuilds(endpoints, "libero_spatial", [(0, 0), (3, 1), (5, 30)], 7, connect=Connection)
    builds.wait()
    assert [(c.endpoint, c.resets, c.closed) for c in by_endpoint()] == [
        (e, [("libero_spatial", t, k, 7, 0)], True)
        for e, (t, k) in zip(endpoints, ((0, 0), (3, 0), (5, 29)), strict=True)
    ]
    # each connection lives in one thread of its own, not the caller's: no socket shared between threads
    assert all(len(c.threads) == 1 and main not in c.threads for c in connections)
    assert len(set().union(*(c.threads for c in connections))) == 3
    started.reset()
    connections.clear()
    endpoints = ["tcp://a", "tcp://failing", "tcp://c"]
    builds = EnvironmentBuilds(endpoints, "s", [(0, 0), (9, 0), (1, 0)], 7, connect=Connection)
    with pytest.raises(SimError, match="task: 9"):
        builds.wait()
    assert len(connections) == 3 and all(len(c.resets) == 1 and c.closed for c in connections)


def test_sim_servers_start_together_and_stop_together_on_a_failure(monkeypatch):
    """Every process is spawned before any is waited for; when one never answers, all are stopped."""
    from vla_runtime.sim import launcher

    events = []

    class Server:
        def __init__(self, log_path, wait):
            assert wait is False
            self.name = log_path
            events.append(("spawn", log_path))

        def wait_ready(self):
            events.append(("ready", self.name))
            if self.name == failing:
                raise TimeoutError("sim server: no answer")

        def stop(self):
            events.append(("stop", self.name))

    monkeypatch.setattr(launcher, "SimServerProcess", Server)
    failing = None
    servers = launcher.start_sim_servers(["a", "b", "c"])
    assert [s.name for s in servers] == ["a", "b", "c"]
    assert events == [("spawn", n) for n in "abc"] + [("ready", n) for n in "abc"]
    events.clear()
    failing = "b"
    with pytest.raises(TimeoutError):
        launcher.start_sim_servers(["a", "b", "c"])
    assert events[:5] == [("spawn", n) for n in "abc"] + [("ready", "a"), ("ready", "b")]
    assert sorted(events[5:]) == [("stop", n) for n in "abc"]
