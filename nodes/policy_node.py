"""The ROS 2 policy node: camera images, joint state and an instruction in; action chunks out on a
deadline-driven timer (20 Hz by default); diagnostics at 1 Hz.

Life cycle (rclpy LifecycleNode): configure loads the policy and captures its graphs, activate starts the
timers, deactivate stops them, cleanup releases the policy. With `autostart` (the default) the node
configures and activates itself, so `ros2 run` / `ros2 launch` start it serving.

Topics are relative, so a namespace places them:
  in   camera/<name>/image_raw (sensor_msgs/Image, rgb8|bgr8, sensor-data QoS), joint_states
       (sensor_msgs/JointState, or std_msgs/Float32MultiArray), instruction (std_msgs/String)
  out  action_chunk (trajectory_msgs/JointTrajectory: header.stamp = when the observation was taken,
       one point per action still ahead, time_from_start = k * control period), policy_diagnostics
       (diagnostic_msgs/DiagnosticArray)

The timer never waits for inference: it submits the newest complete observation to the executor and
publishes whatever `DeadlineScheduler` says is due.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import rclpy
import rclpy.executors
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float32MultiArray, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from ..runtime.config import RuntimeConfig
from ..runtime.executor import FrameDropped, PipelinedExecutor
from ..runtime.scheduler import DeadlineScheduler, ScheduledActions
from ..runtime.types import ActionChunk, Observation
from .conversions import image_to_rgb, seconds_to_stamp, stamp_to_seconds, state_vector
from .params import BY_NAME, PARAMS, STATE_IN_PROMPT

LOG_THROTTLE_S = 2.0


class PolicyNode(LifecycleNode):
    def __init__(self, node_name: str = "policy_node", **kwargs):
        super().__init__(node_name, **kwargs)
        for p in PARAMS:
            descriptor = ParameterDescriptor(description=p.description)
            if p.range is not None and isinstance(p.default, float):
                descriptor.floating_point_range = [
                    FloatingPointRange(from_value=p.range[0], to_value=p.range[1])
                ]
            elif p.range is not None and isinstance(p.default, int):
                descriptor.integer_range = [
                    IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]))
                ]
            self.declare_parameter(p.name, p.default, descriptor)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._parameters_changed)
        self.policy: PipelinedExecutor | None = None
        self.scheduler: DeadlineScheduler | None = None
        self.recorder = None  # ObservationRecorder while record_observations names a file
        self._lock = threading.Lock()
        self._images: dict[str, tuple[np.ndarray, float]] = {}
        self._state: tuple[np.ndarray, float] | None = None
        self._instruction: str | None = None
        self._last_submitted = None
        self._subscriptions_made: list = []
        self._timers: list = []
        self.counters = {"bad_inputs": 0, "stale_inputs": 0, "submitted": 0, "published": 0, "refused": 0}
        self._fresh_times: list[float] = []

    # ------------------------------------------------------------------ parameters
    def param(self, name: str):
        return self.get_parameter(name).value

    def _check_parameters(self, params) -> SetParametersResult:
        for p in params:
            spec = BY_NAME.get(p.name)
            if spec is None:
                continue
            reason = spec.check(p.value)
            if reason:
                return SetParametersResult(successful=False, reason=f"{p.name}: {reason}")
        return SetParametersResult(successful=True)

    def _parameters_changed(self, params) -> None:
        names = {p.name for p in params}
        if names & {"rate_hz", "diagnostics_rate_hz"} and self._timers:
            self._start_timers()
        if self.scheduler is not None and "control_period_s" in names:
            self.scheduler.period_s = self.param("control_period_s")
        later = sorted(n for n in names if n in BY_NAME and BY_NAME[n].needs_reconfigure)
        if later and self.policy is not None:
            self.get_logger().info(f"{', '.join(later)} take effect at the next configure")

    # ------------------------------------------------------------------ life cycle
    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as err:  # noqa: BLE001 - a failed configure is reported and leaves the node unconfigured
            self.get_logger().error(f"configure failed: {err}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        return super().on_configure(state)

    def _configure(self) -> None:
        cameras = list(self.param("cameras"))
        joints = list(self.param("joint_names"))
        config = RuntimeConfig(
            preset=self.param("preset") or None,
            checkpoint=self.param("checkpoint") or None,
            action_horizon=self.param("action_horizon") or None,
            n_action_steps=self.param("n_action_steps") or None,
            max_token_len=self.param("max_token_len") or None,
            state_in_prompt=STATE_IN_PROMPT[self.param("state_in_prompt")],
            allow_unnormalized=self.param("allow_unnormalized"),
            fp8_calibration=self.param("fp8_calibration") or None,
            fp8_calibration_margin=self.param("fp8_calibration_margin"),
            tokenizer=self.param("tokenizer") or None,
            robot=self.param("robot") or None,
            device=self.param("device"),
            precision=self.param("precision"),
            vision_precision=self.param("vision_precision") or None,
            fp8_expert=self.param("fp8_expert"),
            steps=self.param("steps") or None,
            seed=self.param("seed"),
            state_dim=self.param("state_dim"),
            robot_action_dim=len(joints),
            optional_cameras=tuple(c for c in self.param("optional_cameras") if c in cameras),
        )
        model_cameras = config.model.camera_names
        unknown = [c for c in cameras if c not in model_cameras]
        if unknown:
            raise ValueError(
                f"cameras: {unknown} are not cameras of {config.model_name} ({', '.join(model_cameras)})"
            )
        missing = [c for c in model_cameras if c not in cameras and c not in config.optional_camera_names]
        if missing:
            raise ValueError(f"cameras: the model needs {missing}")
        self.get_logger().info(f"loading {config.model_name} on {config.device} ({config.precision})")
        self.policy = PipelinedExecutor(config)
        if self.policy.parts.random_weights:
            self.get_logger().warning("no checkpoint: RANDOM WEIGHTS, the actions are meaningless")
        self.scheduler = DeadlineScheduler(self.param("control_period_s"))
        self.cameras, self.joint_names = cameras, joints
        if self.param("record_observations"):
            from ..runtime.recording import ObservationRecorder

            self.recorder = ObservationRecorder(self.param("record_observations"), self.get_namespace())
        for name in cameras:
            topic = f"camera/{name}/image_raw"
            self._subscriptions_made.append(
                self.create_subscription(
                    Image,
                    topic,
                    lambda msg, name=name, topic=topic: self._on_image(name, topic, msg),
                    qos_profile_sensor_data,
                )
            )
        if self.param("state_msg_type") == "joint_state":
            self._subscriptions_made.append(
                self.create_subscription(JointState, "joint_states", self._on_joint_state, 10)
            )
        else:
            self._subscriptions_made.append(
                self.create_subscription(Float32MultiArray, "joint_states", self._on_state_array, 10)
            )
        self._subscriptions_made.append(
            self.create_subscription(String, "instruction", self._on_instruction, 10)
        )
        qos = QoSProfile(
            depth=self.param("action_queue_depth"),
            reliability=ReliabilityPolicy.RELIABLE
            if self.param("action_reliable")
            else ReliabilityPolicy.BEST_EFFORT,
        )
        self.chunk_pub = self.create_lifecycle_publisher(JointTrajectory, "action_chunk", qos)
        self.diag_pub = self.create_lifecycle_publisher(DiagnosticArray, "policy_diagnostics", 10)

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._start_timers()
        self.get_logger().info(f"serving at {self.param('rate_hz')} Hz")
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._stop_timers()
        if self.policy is not None:
            self.policy.reset()
        if self.scheduler is not None:
            self.scheduler.reset()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._release()
        return super().on_shutdown(state)

    def _release(self) -> None:
        self._stop_timers()
        for sub in self._subscriptions_made:
            self.destroy_subscription(sub)
        self._subscriptions_made.clear()
        for name in ("chunk_pub", "diag_pub"):
            if hasattr(self, name):
                self.destroy_lifecycle_publisher(getattr(self, name))
                delattr(self, name)
        if self.policy is not None:
            self.policy.close()
            self.policy = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def _start_timers(self) -> None:
        self._stop_timers()
        self._timers = [
            self.create_timer(1.0 / self.param("rate_hz"), self._tick),
            self.create_timer(1.0 / self.param("diagnostics_rate_hz"), self._publish_diagnostics),
        ]

    def _stop_timers(self) -> None:
        for timer in self._timers:
            self.destroy_timer(timer)
        self._timers = []

    # ------------------------------------------------------------------ inputs
    def _bad_input(self, topic: str, err: Exception) -> None:
        with self._lock:
            self.counters["bad_inputs"] += 1
        self.get_logger().error(f"{topic}: {err}; input dropped", throttle_duration_sec=LOG_THROTTLE_S)

    def _on_image(self, name: str, topic: str, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except ValueError as err:
            return self._bad_input(topic, err)
        with self._lock:
            self._images[name] = (rgb, stamp_to_seconds(msg.header.stamp))

    def _store_state(self, topic: str, values, stamp: float) -> None:
        try:
            state = state_vector(
                values,
                self.param("state_dim"),
                "position" if self.param("state_msg_type") == "joint_state" else "data",
            )
        except ValueError as err:
            return self._bad_input(topic, err)
        with self._lock:
            self._state = (state, stamp)

    def _on_joint_state(self, msg: JointState) -> None:
        self._store_state("joint_states", msg.position, stamp_to_seconds(msg.header.stamp))

    def _on_state_array(self, msg: Float32MultiArray) -> None:
        # Float32MultiArray has no header: it is stamped on arrival.
        self._store_state("joint_states", msg.data, self.now())

    def _on_instruction(self, msg: String) -> None:
        if not msg.data.strip():
            return self._bad_input("instruction", ValueError("data: empty instruction"))
        with self._lock:
            self._instruction = msg.data

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def newest_observation(self) -> Observation | None:
        """The newest complete observation, stamped with its oldest part's time; None if incomplete."""
        with self._lock:
            needed = [c for c in self.cameras if c not in self.policy.config.optional_camera_names]
            if self._state is None or self._instruction is None or any(c not in self._images for c in needed):
                return None
            images = {name: rgb for name, (rgb, _) in self._images.items()}
            stamp = min([s for _, s in self._images.values()] + [self._state[1]])
            return Observation(images, self._state[0], self._instruction, stamp)

    # ------------------------------------------------------------------ the control tick
    def _tick(self) -> None:
        now = self.now()
        obs = self.newest_observation()
        if obs is not None:
            age = now - obs.timestamp
            if age > self.param("max_obs_age_s"):
                with self._lock:
                    self.counters["stale_inputs"] += 1
                self.get_logger().warning(
                    f"stale inputs: the newest observation is {age:.2f} s old "
                    f"(max_obs_age_s {self.param('max_obs_age_s')}); not submitted",
                    throttle_duration_sec=LOG_THROTTLE_S,
                )
            elif obs.timestamp != self._last_submitted:
                self._submit(obs)
        scheduled = self.scheduler.tick(now)
        if scheduled is not None:
            self.chunk_pub.publish(self._trajectory(scheduled))
            with self._lock:
                self.counters["published"] += 1

    def _submit(self, obs: Observation) -> None:
        try:
            future = self.policy.submit(obs, steps=self.param("steps") or None)
        except ValueError as err:  # e.g. an instruction too long for the prompt, a wrong image shape
            with self._lock:
                self.counters["refused"] += 1
            self.get_logger().error(f"observation refused: {err}", throttle_duration_sec=LOG_THROTTLE_S)
            self._last_submitted = obs.timestamp
            return
        self._last_submitted = obs.timestamp
        with self._lock:
            self.counters["submitted"] += 1
        if self.recorder is not None:
            self.recorder.write(obs)  # what was served, for `vla-runtime calibrate`
        future.add_done_callback(self._on_chunk)

    def _on_chunk(self, future) -> None:
        """Runs on the executor's completion thread."""
        err = future.exception()
        if isinstance(err, FrameDropped):
            return  # counted by the executor, reported in diagnostics
        if err is not None:
            self.get_logger().error(f"inference failed: {err}", throttle_duration_sec=LOG_THROTTLE_S)
            return
        chunk: ActionChunk = future.result()
        delay = self.param("inject_latency_s")
        if delay > 0:
            time.sleep(delay)  # testing aid: holds the executor's completion thread, as a slow GPU would
        self._accept(chunk)

    def _accept(self, chunk: ActionChunk) -> None:
        if self.scheduler is not None:
            self.scheduler.offer(chunk)
            with self._lock:
                self._fresh_times.append(time.monotonic())

    def _trajectory(self, scheduled: ScheduledActions) -> JointTrajectory:
        msg = JointTrajectory()
        msg.header.stamp = seconds_to_stamp(scheduled.chunk.timestamp, Time)
        msg.joint_names = list(self.joint_names)
        period = self.scheduler.period_s
        for offset, action in enumerate(scheduled.actions):
            t = (scheduled.first_index + offset) * period
            sec = int(t)
            msg.points.append(
                JointTrajectoryPoint(
                    positions=[float(a) for a in action],
                    time_from_start=Duration(sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000),
                )
            )
        return msg

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict:
        now = time.monotonic()
        with self._lock:
            self._fresh_times = [t for t in self._fresh_times if now - t <= 5.0]
            counters = dict(self.counters)
            chunk_rate = len(self._fresh_times) / 5.0
        report = self.policy.report() if self.policy is not None else {"counters": {}, "latency_ms": {}}
        sched = self.scheduler.counters if self.scheduler is not None else {}
        values = {
            "chunk_rate_hz": round(chunk_rate, 2),
            "deadline_misses": sched.get("misses", 0),
            "chunks_exhausted": sched.get("exhausted", 0),
            "dropped_frames": report["counters"].get("dropped", 0),
            **counters,
        }
        for stage in ("vision", "prefix", "denoise", "total"):
            s = report["latency_ms"].get(stage)
            if s:
                values[f"{stage}_p50_ms"] = round(s["p50"], 3)
                values[f"{stage}_p99_ms"] = round(s["p99"], 3)
        return values

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics()
        level, message = DiagnosticStatus.OK, "serving"
        if values["stale_inputs"] and self._stale_recently():
            level, message = DiagnosticStatus.WARN, "stale inputs"
        elif values["chunk_rate_hz"] == 0:
            level, message = DiagnosticStatus.WARN, "no chunks"
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: policy",
            message=message,
            hardware_id=self.policy.parts.model_id if self.policy else "",
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
        )
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def _stale_recently(self) -> bool:
        obs = self.newest_observation()
        return obs is None or self.now() - obs.timestamp > self.param("max_obs_age_s")


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = PolicyNode()
    try:
        if node.param("autostart"):
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            else:
                node.get_logger().error("autostart: configure failed; waiting for lifecycle transitions")
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node._release()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    main()
