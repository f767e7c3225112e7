"""A robot stand-in for node tests: real rclpy publishers of cameras, joint state and an instruction,
subscribers of action_chunk and policy_diagnostics, and the node itself in a separate process."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# Isolation: a domain of our own, discovery on this machine only. Set before rclpy initialises.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(110, 200)))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["AMENT_PREFIX_PATH"] = sys.prefix

import rclpy  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402
from vla_runtime.nodes.conversions import rgb_to_image, seconds_to_stamp, stamp_to_seconds  # noqa: E402

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb")
JOINTS = [f"joint_{i}" for i in range(8)]


class PolicyNodeProcess:
    """`python -m vla_runtime node --ros-args ...` in its own process, its log in a file."""

    def __init__(
        self,
        tmp_path: Path,
        *ros_params: str,
        namespace: str = "",
        script: Path | None = None,
        command: list[str] | None = None,
    ):
        """`script`: a node script of the tests (another policy behind the same node) instead of the CLI;
        `command`: another CLI command (e.g. ["fleet", "--namespaces", "/a,/b"])."""
        self.log_path = tmp_path / f"node-{time.monotonic_ns()}.log"
        entry = [str(script)] if script else ["-m", "vla_runtime", *(command or ["node"])]
        args = [sys.executable, *entry, "--ros-args"]
        if namespace:
            args += ["-r", f"__ns:={namespace}"]
        for p in ros_params:
            args += ["-p", p]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return needle in self.text()
            time.sleep(0.1)
        return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: rclpy shuts down cleanly
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.proc.returncode


class Robot:
    """Publishes inputs at `rate_hz` from a thread; records everything the policy node sends."""

    def __init__(
        self,
        rate_hz: float = 20.0,
        image_side: int = 96,
        state_dim: int = 8,
        namespace: str = "",
        cameras: tuple[str, ...] = CAMERAS,
    ):
        if not rclpy.ok():
            rclpy.init()
        self.node = rclpy.create_node(f"fake_robot_{time.monotonic_ns()}", namespace=namespace or None)
        self.namespace = namespace
        self.rate_hz, self.image_side, self.state_dim = rate_hz, image_side, state_dim
        self.cams = {
            c: self.node.create_publisher(Image, f"camera/{c}/image_raw", qos_profile_sensor_data)
            for c in cameras
        }
        self.silent_cameras: set[str] = set()  # cameras that stopped publishing
        self.joint_names = JOINTS[:state_dim]  # JointState.name; the positions are 0, 1, 2, ... by name
        self.clock_pub = self.node.create_publisher(Clock, "/clock", 10)
        self.state_pub = self.node.create_publisher(JointState, "joint_states", 10)
        self.instruction_pub = self.node.create_publisher(String, "instruction", 10)
        self.chunks: list[tuple[float, JointTrajectory]] = []
        self.diagnostics: list[dict] = []
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(
            JointTrajectory, "action_chunk", lambda m: self.chunks.append((self.now(), m)), reliable
        )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()
        self.publishing = threading.Event()
        self.sabotage: dict | None = None  # replaces one input per cycle while set
        self._rng = np.random.default_rng()
        self._pub_thread = threading.Thread(target=self._publish_loop, daemon=True)
        self._pub_thread.start()

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if not status.name.startswith(f"{self.namespace}/policy_node:"):
                continue  # another test's node
            self.diagnostics.append(
                {
                    "level": int.from_bytes(status.level, "little")
                    if isinstance(status.level, bytes)
                    else int(status.level),
                    "message": status.message,
                    "stamp": stamp_to_seconds(msg.header.stamp),  # the node's clock (sim time there)
                    **{kv.key: kv.value for kv in status.values},
                }
            )

    def _publish_loop(self) -> None:
        while True:
            if self.publishing.is_set():
                self.publish_once()
            time.sleep(1.0 / self.rate_hz)

    def publish_clock(self, seconds: float) -> None:
        self.clock_pub.publish(Clock(clock=seconds_to_stamp(seconds, Time)))

    def publish_once(self, stamp_s: float | None = None) -> float:
        """One observation, stamped now (or at `stamp_s`); returns its stamp in seconds."""
        stamp = self.node.get_clock().now().to_msg() if stamp_s is None else seconds_to_stamp(stamp_s, Time)
        for name, pub in self.cams.items():
            if name in self.silent_cameras:
                continue
            image = self._rng.integers(0, 256, (self.image_side, self.image_side, 3), dtype=np.uint8)
            pub.publish(rgb_to_image(image, Image, stamp))
        # by name, in reverse order: a node reading by index would see the state reversed
        state = JointState(
            name=self.joint_names[::-1], position=[float(JOINTS.index(n)) for n in self.joint_names[::-1]]
        )
        state.header.stamp = stamp
        self.state_pub.publish(state)
        self.instruction_pub.publish(String(data="put the black bowl on the plate"))
        if self.sabotage:
            kind, msg = self.sabotage["kind"], self.sabotage["make"](stamp)
            {"image": self.cams["base_0_rgb"], "state": self.state_pub, "instruction": self.instruction_pub}[
                kind
            ].publish(msg)
        return stamp_to_seconds(stamp)

    def chunk_for(self, stamp: float, timeout: float = 30.0):
        """(arrival time, message) of the first chunk answering the observation stamped `stamp`."""
        found = []

        def arrived():
            found[:] = [(t, m) for t, m in list(self.chunks) if abs(header_seconds(m) - stamp) < 1e-6]
            return bool(found)

        return found[0] if self.wait_for(arrived, timeout) else None

    def first_chunk(self, stamp_s: float | None = None, timeout: float = 60.0, clock: bool = False):
        """Publish one observation again and again until it is answered: the first messages after the node
        subscribes can be lost while discovery completes (sensor-data QoS is best effort). With `clock`,
        /clock is set to the stamp before each try, and the try waits until the node's diagnostics are
        stamped with that time (a node on sim time must have it first)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if clock:
                self.publish_clock(stamp_s)
                if not self.wait_for(
                    lambda: any(abs(d["stamp"] - stamp_s) < 1e-6 for d in list(self.diagnostics)[-3:]), 3.0
                ):
                    continue  # the clock was lost on the way, or no report yet: publish it again
            got = self.chunk_for(self.publish_once(stamp_s), timeout=0.5)
            if got is not None:
                return got
        return None

    def wait_for(self, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def chunks_between(self, t0: float, t1: float) -> list[JointTrajectory]:
        return [m for t, m in self.chunks if t0 <= t < t1]

    def close(self) -> None:
        self.publishing.clear()
        self.executor.shutdown()
        self.node.destroy_node()


def header_seconds(msg) -> float:
    return stamp_to_seconds(msg.header.stamp)


def point_seconds(point) -> float:
    return point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
