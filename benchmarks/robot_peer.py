"""The robot's side of a policy node, for the node benchmarks: publishes stamped camera frames, state and
the instruction, and records when each observation's chunk arrives and what the node's diagnostics say.
The node runs in its own process (`policy_node_command`), as on a robot. Needs rclpy (ROS 2 Jazzy).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def frames(rng: np.random.Generator, n: int, side: int = 224) -> list[tuple[dict, np.ndarray]]:
    """`n` distinct observations (camera images, state), cycled by the measurements."""
    return [
        (
            {c: rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for c in CAMERAS},
            rng.uniform(-1, 1, 8).astype(np.float32),
        )
        for _ in range(n)
    ]


def paced(rate_hz: float, seconds: float):
    """Yields at `rate_hz` for `seconds` (sleeping between ticks)."""
    period, start = 1.0 / rate_hz, time.perf_counter()
    k = 0
    while k * period < seconds - 1e-9:  # by the offsets: start + k * period rounds with the clock's value
        time.sleep(max(0.0, start + k * period - time.perf_counter()))
        yield k
        k += 1


def policy_node_command(params: dict, instant: bool = False) -> list[str]:
    """The policy node's command line with `params` (ROS parameter values as text); `instant`: the node's
    floor, a policy that answers at once (benchmarks/instant_policy_node.py)."""
    if instant:
        command = [sys.executable, str(Path(__file__).with_name("instant_policy_node.py")), "--ros-args"]
    else:
        command = [sys.executable, "-m", "vla_runtime", "node", "--ros-args"]
    for k, v in params.items():
        command += ["-p", f"{k}:={v}"]
    return command


class RobotPeer:
    """A ROS node in this process standing for the robot: `publish(k)` sends observation k (its frames
    built ahead, stamped when sent); `arrivals` maps each chunk's stamp to its arrival (wall clock), and
    `diagnostics` holds the policy node's latest values. rclpy is initialised by the first peer. Make it
    before spawning the node: the node inherits the ROS domain and discovery range it sets."""

    def __init__(self, data: list[tuple[dict, np.ndarray]]):
        os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
        import rclpy
        from builtin_interfaces.msg import Time
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory
        from vla_runtime.nodes.conversions import rgb_to_image, seconds_to_stamp, stamp_to_seconds

        self._rclpy, self._Time, self._String = rclpy, Time, String
        self._seconds_to_stamp, self._stamp_to_seconds = seconds_to_stamp, stamp_to_seconds
        if not rclpy.ok():
            rclpy.init()
        self.node = rclpy.create_node("robot_peer")
        self._cams = {
            c: self.node.create_publisher(Image, f"camera/{c}/image_raw", qos_profile_sensor_data)
            for c in CAMERAS
        }
        self._state_pub = self.node.create_publisher(JointState, "joint_states", 10)
        self._instruction_pub = self.node.create_publisher(String, "instruction", 10)
        self.arrivals: dict[float, float] = {}
        self.diagnostics: dict = {}
        self.publish_ms: list[float] = []

        def on_chunk(raw: bytes):
            # raw: the arrival time is taken before Python builds the message (a robot's C++ controller
            # would not pay for that); the stamp is read afterwards
            now = time.time()
            msg = deserialize_message(raw, JointTrajectory)
            self.arrivals.setdefault(round(stamp_to_seconds(msg.header.stamp), 6), now)

        def on_diag(msg):
            for status in msg.status:
                if status.name.startswith("/policy_node"):
                    self.diagnostics.clear()
                    self.diagnostics.update({kv.key: kv.value for kv in status.values})

        self.node.create_subscription(
            JointTrajectory,
            "action_chunk",
            on_chunk,
            QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE),
            raw=True,
        )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        # DDS discovery: the node's camera subscription seen by this peer (no frame reaches it before)
        self.first_camera = self._cams[CAMERAS[0]]
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        threading.Thread(target=self._executor.spin, daemon=True).start()
        # The messages are built ahead, as a camera driver has its buffer ready; each is stamped when sent.
        self._prebuilt = [
            ({c: rgb_to_image(images[c], Image) for c in CAMERAS}, JointState(position=state.tolist()))
            for images, state in data
        ]

    def publish(self, k: int, instruction: bool | None = None) -> float:
        """Observation k, stamped now; returns its stamp (seconds, as the chunk carries it back). The
        instruction goes with every 30th, as a robot would send it (not with every frame), or as
        `instruction` says."""
        image_msgs, state_msg = self._prebuilt[k % len(self._prebuilt)]
        start = time.perf_counter()
        stamp = self._seconds_to_stamp(time.time(), self._Time)
        for camera, pub in self._cams.items():
            image_msgs[camera].header.stamp = stamp
            pub.publish(image_msgs[camera])
        state_msg.header.stamp = stamp
        self._state_pub.publish(state_msg)
        if instruction is None:
            instruction = k % 30 == 0
        if instruction:
            self._instruction_pub.publish(self._String(data=INSTRUCTION))
        self.publish_ms.append((time.perf_counter() - start) * 1e3)
        return round(self._stamp_to_seconds(stamp), 6)

    def node_listens(self) -> bool:
        """The policy node's camera subscription is matched with this peer's publisher."""
        return self.first_camera.get_subscription_count() > 0

    def close(self, shutdown: bool = True) -> None:
        """Stop this peer; `shutdown`: and rclpy with it (the last peer of the process)."""
        self._executor.shutdown()
        self.node.destroy_node()
        if shutdown:
            self._rclpy.shutdown()
