"""The LIBERO sim bridge node: the simulator seen through the policy node's topics.

It publishes the sim's cameras (camera/base_0_rgb, camera/left_wrist_0_rgb), state (joint_states) and
instruction, and executes the `action_chunk`s the policy node sends back:
- lockstep (evaluation): after each observation the sim waits for the chunk stamped with that
  observation's time, executes its first `replan_steps` actions, then publishes the next observation;
- wall_clock: a timer at `rate_hz` steps the sim with the action due now; a tick on which the chunk for
  the previous observation has not arrived is a deadline miss, and a tick the simulator itself could not
  keep (LIBERO renders on the CPU at ~0.2-1 s per step) is an overrun.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..sim.client import SimClient
from ..sim.evaluate import MAX_STEPS
from ..sim.mapping import CAMERA_MAP, to_libero_action
from ..sim.report import EpisodeResult
from .conversions import rgb_to_image, stamp_to_seconds


class SimBridgeNode(Node):
    def __init__(self, endpoint: str, node_name: str = "sim_bridge", **kwargs):
        super().__init__(node_name, **kwargs)
        self.client = SimClient(endpoint)
        self.image_pubs = {
            cam: self.create_publisher(Image, f"camera/{cam}/image_raw", qos_profile_sensor_data)
            for cam in CAMERA_MAP
        }
        self.state_pub = self.create_publisher(JointState, "joint_states", 10)
        self.instruction_pub = self.create_publisher(String, "instruction", 10)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(JointTrajectory, "action_chunk", self._on_chunk, reliable)
        self.create_subscription(DiagnosticArray, "policy_diagnostics", self._on_diagnostics, 10)
        self.policy_diagnostics: dict = {}
        self._chunks: list[tuple[float, JointTrajectory]] = []
        self._cond = threading.Condition()

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_chunk(self, msg: JointTrajectory) -> None:
        with self._cond:
            self._chunks.append((self.now(), msg))
            del self._chunks[:-20]
            self._cond.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            self.policy_diagnostics = {kv.key: kv.value for kv in status.values}

    def publish_observation(self, sim_obs: dict) -> float:
        stamp_msg = self.get_clock().now().to_msg()
        for cam, key in CAMERA_MAP.items():
            self.image_pubs[cam].publish(rgb_to_image(sim_obs[key], Image, stamp_msg))
        state = JointState(position=[float(v) for v in sim_obs["state"]])
        state.header.stamp = stamp_msg
        self.state_pub.publish(state)
        self.instruction_pub.publish(String(data=sim_obs["instruction"]))
        return stamp_to_seconds(stamp_msg)

    def wait_for_chunk(self, stamp: float, timeout_s: float) -> tuple[float, JointTrajectory] | None:
        """The first chunk stamped with observation time `stamp`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for received, msg in self._chunks:
                    if abs(stamp_to_seconds(msg.header.stamp) - stamp) < 1e-6:
                        return received, msg
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def run_lockstep(
        self,
        suite: str,
        task: int,
        init_state: int = 0,
        *,
        max_steps: int | None = None,
        replan_steps: int = 5,
        seed: int = 7,
        settle_steps: int = 10,
        chunk_timeout_s: float = 120.0,
        frames: list | None = None,
    ) -> EpisodeResult:
        sim_obs = self.client.reset(suite, task, init_state, seed, settle_steps)
        result = EpisodeResult(suite, task, init_state, sim_obs["instruction"], "ros-lockstep")
        limit = max_steps or MAX_STEPS.get(suite, 300)
        while result.steps < limit:
            stamp = self.publish_observation(sim_obs)
            if frames is not None and not frames:
                frames.append(sim_obs["agentview"])
            got = self.wait_for_chunk(stamp, chunk_timeout_s)
            if got is None:
                raise TimeoutError(
                    f"no action_chunk for the observation at {stamp:.3f} within {chunk_timeout_s} s"
                )
            received, msg = got
            result.add_timings({"total": (received - stamp) * 1e3})
            result.deadline_misses += int(received - stamp > 0.05)
            done = False
            for point in msg.points[:replan_steps]:
                reply = self.client.step(to_libero_action(np.asarray(point.positions, dtype=np.float32)))
                sim_obs = reply["observation"]
                result.steps += 1
                result.success_per_step.append(bool(reply["success"]))
                if frames is not None:
                    frames.append(sim_obs["agentview"])
                if reply["success"] or reply["done"] or result.steps >= limit:
                    done = True
                    break
            if done:
                break
        result.success = any(result.success_per_step)
        result.policy_diagnostics = dict(self.policy_diagnostics)
        return result

    def run_wall_clock(
        self,
        suite: str,
        task: int,
        init_state: int = 0,
        *,
        max_steps: int | None = None,
        rate_hz: float = 20.0,
        seed: int = 7,
        settle_steps: int = 10,
        first_chunk_timeout_s: float = 120.0,
    ) -> EpisodeResult:
        sim_obs = self.client.reset(suite, task, init_state, seed, settle_steps)
        result = EpisodeResult(suite, task, init_state, sim_obs["instruction"], "ros-wall-clock")
        limit = max_steps or MAX_STEPS.get(suite, 300)
        period = 1.0 / rate_hz
        stamp = self.publish_observation(sim_obs)
        if self.wait_for_chunk(stamp, first_chunk_timeout_s) is None:  # the policy is up and serving
            raise TimeoutError("the policy node did not answer the first observation")
        overruns = 0
        next_tick = time.monotonic()
        previous_stamp = stamp
        while result.steps < limit:
            next_tick += period
            time.sleep(max(0.0, next_tick - time.monotonic()))
            now = self.now()
            with self._cond:
                received, msg = self._chunks[-1]
            chunk_stamp = stamp_to_seconds(msg.header.stamp)
            result.deadline_misses += int(
                chunk_stamp < previous_stamp - 1e-6
            )  # no chunk for the last obs yet
            due = [
                p
                for p in msg.points
                if chunk_stamp + p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 >= now - period / 2
            ]
            action = np.asarray(due[0].positions if due else msg.points[-1].positions, dtype=np.float32)
            reply = self.client.step(to_libero_action(action))
            sim_obs = reply["observation"]
            result.steps += 1
            result.success_per_step.append(bool(reply["success"]))
            previous_stamp = self.publish_observation(sim_obs)
            result.add_timings({"total": (received - chunk_stamp) * 1e3})
            if time.monotonic() > next_tick + period:
                overruns += 1
                next_tick = time.monotonic()  # the sim cannot keep the rate: do not try to catch up
            if reply["success"] or reply["done"]:
                break
        result.success = any(result.success_per_step)
        result.policy_diagnostics = {**self.policy_diagnostics, "sim_overruns": overruns}
        self.get_logger().info(
            f"wall clock: {overruns} of {result.steps} ticks overran {period * 1e3:.0f} ms"
        )
        return result
