"""The LIBERO report's statistics."""

from __future__ import annotations

import pytest
from vla_runtime.sim.report import EpisodeResult, headline, summarize, wilson_interval


def test_wilson_interval_of_a_success_rate():
    assert wilson_interval(0, 0) == [0.0, 1.0]
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.08  # no success in 50 trials: up to about 7% is still possible
    lo, hi = wilson_interval(25, 50)
    assert lo == pytest.approx(0.366, abs=1e-3) and hi == pytest.approx(0.634, abs=1e-3)
    lo, hi = wilson_interval(50, 50)
    assert 0.92 < lo < 0.95 and hi == 1.0


def episode(wall_s, reset_ms, step_ms, sim_ms, waits_ms) -> EpisodeResult:
    e = EpisodeResult("libero_spatial", 0, 0, "pick", "in-process lockstep", steps=len(step_ms))
    e.wall_s, e.reset_ms, e.step_ms, e.sim_ms, e.chunk_wait_ms = wall_s, reset_ms, step_ms, sim_ms, waits_ms
    return e


def test_where_the_episodes_time_went():
    """Summed over episodes, the simulator's part inside the steps; none claimed from a server that did
    not say (an earlier version's)."""
    episodes = [
        episode(2.0, 500.0, [100.0, 300.0], [80.0, 250.0], [200.0]),
        episode(1.0, 100.0, [200.0], [150.0], [50.0, 50.0]),
    ]
    t = summarize(episodes)["time"]
    assert (t["episodes_s"], t["resets_s"], t["steps_s"], t["chunk_waits_s"]) == (3.0, 0.6, 0.6, 0.3)
    assert t["simulator_s"] == 0.48 and t["other_s"] == 1.5
    assert t["step_ms"]["p50"] == 200.0 and t["simulator_step_ms"]["p50"] == 150.0
    assert any("the simulator's own 0.5" in line for line in headline(summarize(episodes), "lockstep"))
    silent = [episode(1.0, 100.0, [200.0], [], [50.0])]
    t = summarize(silent)["time"]
    assert t["simulator_s"] is None and t["steps_s"] == 0.2
    assert not any("simulator's own" in line for line in headline(summarize(silent), "lockstep"))


def test_a_late_answer_from_an_earlier_episode_does_not_block_the_next():
    """An episode ended while its request was out; the answer comes in the next episode and must not
    count as that episode's (it used to make the link skip every later observation)."""
    from concurrent.futures import Future

    import numpy as np
    from vla_runtime.runtime.handover import PreviousChunk
    from vla_runtime.runtime.types import Observation
    from vla_runtime.sim.episode import InProcessLink

    class Policy:
        def __init__(self):
            self.futures = []

        def submit(self, obs, noise=None, previous=None):
            self.futures.append(Future())
            return self.futures[-1]

        def reset(self):
            pass

    policy = Policy()
    link = InProcessLink(policy, lockstep=True, noise_shape=())
    obs = Observation({}, np.zeros(8, np.float32), "x", 1.0)
    previous = PreviousChunk(np.zeros((3, 7), np.float32), 0)
    link.offer(obs)
    link.start_episode()  # the next episode; the first request is still out
    policy.futures[0].set_exception(RuntimeError("late"))  # answered now: belongs to the old episode
    link.offer(Observation({}, np.zeros(8, np.float32), "x", 2.0))
    link.offer(Observation({}, np.zeros(8, np.float32), "x", 3.0), previous)  # waits for the one in flight
    assert len(policy.futures) == 2
    policy.futures[1].set_exception(RuntimeError("answered"))
    link.offer(Observation({}, np.zeros(8, np.float32), "x", 4.0), previous)
    assert len(policy.futures) == 3
