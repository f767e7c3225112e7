"""The LIBERO sim bridge: the simulator seen through the policy node's topics, as a `PolicyLink` of the
one episode loop (sim/episode.py).

It publishes the sim's cameras (camera/base_0_rgb, camera/left_wrist_0_rgb), state (joint_states, with
joint names) and instruction, stamped with the episode clock; in lockstep it also publishes that clock
on /clock, and the policy node runs on it (use_sim_time), so every chunk is aligned to its observation
exactly. Chunks come back on action_chunk; the index of each point's action is its time_from_start in
control periods, so the loop executes actions [0:k] of the policy's chunk whatever the node cut.
"""

from __future__ import annotations

import time

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..runtime.types import Observation
from ..sim.episode import CONTROL_PERIOD_S, PolicyLink
from ..sim.mapping import CAMERA_MAP
from .conversions import rgb_to_image, seconds_to_stamp, stamp_to_seconds

STATE_NAMES = [f"state_{i}" for i in range(8)]  # LIBERO's 8 state values, by name (see sim/mapping.py)


class SimBridgeLink(PolicyLink):
    path = "ros"
    lossy = True  # camera images travel best effort

    def __init__(self, lockstep: bool, node_name: str = "sim_bridge", namespace: str = "", context=None):
        super().__init__(lockstep)
        self.node = Node(node_name, namespace=namespace or None, context=context)
        self.image_pubs: dict[str, object] = {}
        for camera in CAMERA_MAP:  # the sim's cameras: made now, so they are matched before the first frame
            self._image_pub(camera)
        self.state_pub = self.node.create_publisher(JointState, "joint_states", 10)
        self.instruction_pub = self.node.create_publisher(String, "instruction", 10)
        self.clock_pub = self.node.create_publisher(Clock, "/clock", 10)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(JointTrajectory, "action_chunk", self._on_chunk, reliable)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.policy_node_name = f"{namespace}/policy_node: policy"
        self._diagnostics: dict = {}
        self._diagnostics_seen = 0  # messages received, so a caller can wait for one newer than now
        if lockstep:
            self._publish_clock()

    def _image_pub(self, camera: str):
        if camera not in self.image_pubs:
            self.image_pubs[camera] = self.node.create_publisher(
                Image, f"camera/{camera}/image_raw", qos_profile_sensor_data
            )
        return self.image_pubs[camera]

    def unmatched_topics(self) -> list[str]:
        """The topics the bridge publishes that no subscription has matched yet (DDS discovery takes a
        while after a node starts; what is published before it is lost)."""
        pubs = [*self.image_pubs.values(), self.state_pub, self.instruction_pub]
        pubs += [self.clock_pub] if self.lockstep else []
        return [p.topic_name for p in pubs if p.get_subscription_count() == 0]

    def _publish_clock(self) -> None:
        self.clock_pub.publish(Clock(clock=seconds_to_stamp(self._sim_time, Time)))

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        self._publish_clock()

    def _send(self, obs: Observation, previous=None) -> None:
        """`previous` is not sent: the policy node builds its own from its scheduler."""
        stamp = seconds_to_stamp(obs.timestamp, Time)
        if self.lockstep:
            self._publish_clock()  # the node's clock reaches the observation's time
        for camera, rgb in obs.images.items():
            self._image_pub(camera).publish(rgb_to_image(rgb, Image, stamp))
        state = JointState(name=STATE_NAMES[: len(obs.state)], position=[float(v) for v in obs.state])
        state.header.stamp = stamp
        self.state_pub.publish(state)
        self.instruction_pub.publish(String(data=obs.instruction))

    def _on_chunk(self, msg: JointTrajectory) -> None:
        if not msg.points:
            return
        first = msg.points[0].time_from_start
        first_index = int(round((first.sec + first.nanosec * 1e-9) / CONTROL_PERIOD_S))
        actions = np.asarray([p.positions for p in msg.points], dtype=np.float32)
        self._received(stamp_to_seconds(msg.header.stamp), first_index, actions)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self.policy_node_name:
                with self._cond:
                    self._diagnostics = {kv.key: kv.value for kv in status.values}
                    self._diagnostics_seen += 1
                    self._cond.notify_all()

    def diagnostics(self, fresh_within_s: float = 3.0) -> dict:
        """The node's figures from a message published after this call, so they cover everything the
        episode sent (the node publishes them periodically); the last known ones if none comes."""
        with self._cond:
            seen = self._diagnostics_seen
            self._cond.wait_for(lambda: self._diagnostics_seen > seen, fresh_within_s)
            return dict(self._diagnostics)

    def wait_until_serving(self, timeout_s: float, alive) -> None:
        """Until the policy node's diagnostics say it serves (loaded, active) and it has subscribed to
        everything the bridge publishes, so the episode's first observation is not lost to discovery (it
        would come back a second later, re-offered, and that second would count in the chunk's age).
        `alive()` False = it died."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._diagnostics.get("phase") != "serving" or self.unmatched_topics():
                if time.monotonic() > deadline or not alive():
                    unmatched = ", ".join(self.unmatched_topics()) or "none"
                    raise RuntimeError(
                        f"the policy node is not serving (phase {self._diagnostics.get('phase')}; "
                        f"topics it has not subscribed to: {unmatched})"
                    )
                self._cond.wait(0.1)

    def close(self) -> None:
        self.node.destroy_node()
