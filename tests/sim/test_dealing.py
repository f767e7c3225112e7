"""How `eval-libero --workers` deals the episodes: every episode once, in task/trial order, shares within
one of each other, and each worker's trials of a task consecutive (one LIBERO environment build each)."""

import random

import pytest
from vla_runtime.cli import server_batch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.sim.evaluate import deal_episodes


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
    """LIBERO's protocol: 500 episodes. Round-robin dealing built an environment for every one of them."""
    shares = deal_episodes(list(range(10)), 50, 8)
    assert sum(map(environment_builds, shares)) == 17  # 10 tasks, 7 of them cut between two workers


@pytest.mark.parametrize(
    "profiles, batches",
    [("powers_of_two", [1, 2, 4, 4, 8, 8, 8, 8, 8]), ("every_size", [1, 2, 3, 4, 5, 6, 8, 8, 8])],
)
def test_a_server_batches_up_to_its_largest_profile_for_more_workers(profiles, batches):
    """More workers than the largest batch profile: the largest, the robots beyond it wait a batch."""
    config = RuntimeConfig(preset="pi05_tiny", batch_profiles=profiles)
    workers = [1, 2, 3, 4, 5, 6, 8, 12, 16]
    assert [server_batch(n, config) for n in workers] == batches
