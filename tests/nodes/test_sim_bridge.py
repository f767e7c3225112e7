"""The one episode loop, in-process and through ROS (a real policy node process, the bridge publishing
/clock): in lockstep the robot executes actions [0:k] of every chunk, exactly as the policy made them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.sim.episode import InProcessLink, run_episode
from vla_runtime.sim.mapping import CAMERA_MAP

from .harness import Robot  # noqa: F401  (sets the ROS environment first)

REPLAN = 4


class FakeSim:
    """A stand-in for the LIBERO server in this test: random frames, records every action it executes."""

    def __init__(self):
        self.rng = np.random.default_rng()
        self.executed: list[np.ndarray] = []

    def _obs(self) -> dict:
        return {
            "agentview": self.rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "wrist": self.rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "state": self.rng.uniform(-1, 1, 8).astype(np.float32),
            "instruction": "put the black bowl on the plate",
        }

    def reset(self, suite, task, init_state, seed, settle_steps) -> dict:
        return self._obs()

    def step(self, action, render=True) -> dict:
        self.executed.append(np.asarray(action))
        obs = self._obs()
        if not render:  # as the sim server: no cameras for a step nobody looks at
            del obs["agentview"], obs["wrist"]
        return {"observation": obs, "success": False, "done": False}


def check_actions_0_to_k(sim: FakeSim, link, result) -> None:
    chunks = sorted(link.received(), key=lambda c: c.stamp)
    assert result.chunks == len(chunks) == 3 and result.steps == 3 * REPLAN
    assert result.executed_indices == list(range(REPLAN)) * 3 and result.late_actions == 0
    for n, chunk in enumerate(chunks):
        assert chunk.first_index == 0
        expected = chunk.actions[:REPLAN, :7]
        assert np.allclose(np.stack(sim.executed[n * REPLAN : (n + 1) * REPLAN]), expected, atol=1e-6)


def test_in_process_lockstep_executes_actions_0_to_k():
    sim = FakeSim()
    link = InProcessLink(EagerPolicy(RuntimeConfig(preset="pi05_tiny", steps=2)), lockstep=True)
    result = run_episode(sim, link, "libero_spatial", 0, max_steps=3 * REPLAN, replan_steps=REPLAN)
    check_actions_0_to_k(sim, link, result)
    assert len(result.engine_ms["total"]) == 3 and len(result.chunk_age_ms) == 3


@pytest.mark.parametrize("namespace", [""])
def test_ros_lockstep_on_sim_time_executes_actions_0_to_k(tmp_path, namespace):
    from vla_runtime.nodes.ros_eval import RosPolicy

    sim = FakeSim()
    params = {"preset": "pi05_tiny", "steps": 2, "state_dim": 8}
    policy = RosPolicy(params, lockstep=True, log_path=tmp_path / "node.log")
    with policy as link:
        # before the first observation the node has subscribed to every camera of the sim, the state, the
        # instruction and the clock: nothing is lost to discovery (lost, it came back a second later)
        assert set(link.image_pubs) == set(CAMERA_MAP) and link.unmatched_topics() == []
        result = run_episode(
            sim, link, "libero_spatial", 0, max_steps=3 * REPLAN, replan_steps=REPLAN, chunk_timeout_s=60
        )
    log = (tmp_path / "node.log").read_text()
    assert "use_sim_time" not in log  # no parameter complaint
    check_actions_0_to_k(sim, link, result)
    assert result.reoffers == 0  # the node had subscribed before the first observation: none lost
    assert result.path == "ros lockstep" and result.policy_diagnostics.get("model_id", "").startswith(
        "pi05_tiny"
    )
    assert policy.node_proc.proc.returncode is not None  # stopped and reaped on the way out


def test_the_policy_node_is_stopped_when_the_ros_teardown_fails(tmp_path):
    """Leaving the evaluation, the bridge's executor gets a bounded time for its callbacks, and the
    policy node process is stopped even when ROS's teardown raises."""
    from vla_runtime.nodes.ros_eval import SHUTDOWN_TIMEOUT_S, RosPolicy

    policy = RosPolicy({"preset": "pi05_tiny"}, lockstep=False, log_path=tmp_path / "node.log")
    calls = []

    def failing_shutdown(timeout_sec=None):
        calls.append(("shutdown", timeout_sec))
        raise RuntimeError("teardown failed")

    policy.executor = SimpleNamespace(shutdown=failing_shutdown)
    policy.node_proc = SimpleNamespace(stop=lambda: calls.append(("stop", None)))
    with pytest.raises(RuntimeError, match="teardown failed"):
        policy.__exit__(None, None, None)
    assert calls == [("shutdown", SHUTDOWN_TIMEOUT_S), ("stop", None)]
