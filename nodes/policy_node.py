"""The ROS 2 policy node: camera images, joint state and an instruction in; action chunks out, each
published the moment it is computed.

Serving is event-driven: every input message may complete an observation (`ObservationAssembler`
matches cameras and state by stamp); a complete observation newer than the last one goes to the policy
at once, and its chunk is published from the policy's completion callback, aligned to the time the
observation was taken (`ChunkScheduler`). A timer at `rate_hz` only watches the deadlines: when an
observation's deadline (`deadline_s` after it was taken) passes with no fresh chunk, it counts a miss
and publishes the still-valid tail of the current chunk.

Life cycle (rclpy LifecycleNode): configure checks the parameters and the checkpoint, then loads the
policy and captures its graphs on a thread of its own (the executor keeps serving parameters, lifecycle
requests and diagnostics; the phase in the diagnostics says "loading" until it is ready), activate starts
serving (once loaded), deactivate stops it, cleanup releases the policy. With `autostart` (the default)
the node configures and activates itself; if that fails it exits with status 1 and the reason.

Topics are relative, so a namespace places them:
  in   camera/<name>/image_raw (sensor_msgs/Image, rgb8|bgr8, sensor-data QoS), joint_states
       (sensor_msgs/JointState, or std_msgs/Float32MultiArray), instruction (std_msgs/String)
  out  action_chunk (trajectory_msgs/JointTrajectory: header.stamp = when the observation was taken,
       one point per action still valid, time_from_start = k * control period)
       /diagnostics (diagnostic_msgs/DiagnosticArray, the standard aggregator topic)
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
import rclpy.executors
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException, ParameterUninitializedException
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float32MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from ..runtime.adaptive import StepsController
from ..runtime.config import RuntimeConfig
from ..runtime.executor import DeviceHung, ExecutorClosed, PipelinedExecutor
from ..runtime.policy import FrameDropped, Policy
from ..runtime.scheduler import ChunkScheduler, ScheduledActions
from ..runtime.timing import LatencyStats
from ..runtime.types import ActionChunk
from . import cdr
from .assembler import AssemblySettings, InputRefused, ObservationAssembler
from .conversions import (
    image_to_rgb,
    seconds_to_stamp,
    stamp_to_seconds,
    state_from_joint_state,
    state_vector,
)
from .params import BY_NAME, PARAMS, command_line_parameters, runtime_config_from_params

LOG_THROTTLE_S = 2.0
CLOCK_JUMP_S = 0.001  # the clock going back by more than this resets the serving state
EXIT_BAD_PARAMETERS = 2
EXIT_CONFIGURE_FAILED = 1


def start_up_error(err: BaseException) -> str:
    """A start-up refusal as one line; rclpy's unknown-arguments error says only the list."""
    if type(err).__name__ == "UnknownROSArgsError":
        return f"unknown ROS arguments after --ros-args: {err}"
    return str(err)


def exit_code_of(err: BaseException) -> int:
    """Autostart's exit code for a failed start: 2 for what the configuration asked that cannot be (a
    ValueError names the parameter, the checkpoint, the camera, or a device this machine lacks), 1 for
    anything else (the device failing, memory)."""
    return EXIT_BAD_PARAMETERS if isinstance(err, ValueError) else EXIT_CONFIGURE_FAILED


# Input problems, each counted and logged (throttled) under its own name.
REFUSAL_CAUSES = ("bad_inputs", "future_stamps", "refused")


class StartupError(Exception):
    """Start-up parameters that cannot be served; the message names each one."""


# The assembly's timing settings, ROS parameters of the same names, applied while serving
ASSEMBLY_TIMING = {f.name for f in dataclasses.fields(AssemblySettings)} - {
    "required_cameras",
    "optional_cameras",
}


def refuse_unavailable_transitions(node: LifecycleNode) -> None:
    """A ChangeState request naming by id a transition the current state does not have (cleanup while
    active, activate before configure) is answered success=False with a warning, as one naming it by
    label is. rclpy before ros2/rclpy#1319 (Jazzy's 7.1.5 here) raised instead, in the executor's spin:
    the node died with a traceback and the request went unanswered."""
    service = node._service_change_state  # rclpy's own service; its callback is the state machine's
    change_state = service.callback

    def checked(request, response):
        if not request.transition.label:
            available = {t[0] for t in node._state_machine.available_transitions}
            if request.transition.id not in available:
                state = node._state_machine.current_state[1]
                node.get_logger().warning(
                    f"change_state: transition {request.transition.id} is not available in state {state}"
                )
                response.success = False
                return response
        return change_state(request, response)

    service.callback = checked


def tagged_path(path: str, tag: str) -> str:
    """`path` with `tag` (a namespace: "/arm_1") before its suffix: robot.mcap -> robot.arm_1.mcap."""
    tag = tag.strip("/").replace("/", ".")  # a dot is in no namespace: /a/b and /a_b stay apart
    if not tag:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{tag}{p.suffix}"))


class PolicyNode(LifecycleNode):
    def __init__(
        self, node_name: str = "policy_node", policy_factory=PipelinedExecutor, record_tag: str = "", **kwargs
    ):
        """`policy_factory(RuntimeConfig) -> Policy`: what serves (the executor; tests and benchmarks give
        a policy of their own through it). `record_tag`: where several nodes share a process and its
        parameters (a fleet), each records to its own file, this tag (its namespace) before the suffix."""
        super().__init__(node_name, **kwargs)
        self._record_tag = record_tag
        self._exit_if_load_fails = False  # autostart's load only: a later configure's failure keeps the node
        self._configure_error: BaseException | None = None  # the last configure's, for autostart's exit code
        refuse_unavailable_transitions(self)
        self._policy_factory = policy_factory
        self._declare_parameters()
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._parameters_changed)
        self.policy: Policy | None = None
        self.scheduler: ChunkScheduler | None = None
        self.steps_controller: StepsController | None = None  # with adaptive_steps
        self.assembler: ObservationAssembler | None = None
        self.recorder = None  # ObservationRecorder while record_observations names a file
        self.phase = "unconfigured"  # unconfigured | loading | inactive | serving | failed: <reason>
        self.finished = rclpy.task.Future()  # resolved with an exit status when the process should end
        self._lock = (
            threading.Lock()
        )  # the input state, counters and clock, shared with the completion thread
        self._epoch = 0  # bumped on every reset: chunks of observations from before it are discarded
        # Hand-over modes: frames of this epoch submitted and not yet answered (see _serve).
        self._handover_in_flight = 0
        # Frames of this epoch on their way: future id -> (observation stamp, steps), for the adaptive
        # steps' overdue check (a frame late before it is answered).
        self._in_flight: dict[int, tuple[float, int]] = {}
        self._handover_mode = "switch"  # the loaded policy's
        self._last_now: float | None = None
        self._active = False  # between activate and deactivate
        self._loader: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self._newest_published = -math.inf  # observation stamp of the newest chunk sent (under the lock)
        self.spans = LatencyStats()  # the node's own time: message in -> submitted, chunk -> published
        self._last_logged: dict[str, float] = {}  # refusal cause -> when it was last logged (monotonic)
        self._subscriptions_made: list = []
        self._deadline_timer = None
        self.counters = dict.fromkeys(
            (*REFUSAL_CAUSES, "stale_inputs", "clock_jumps", "dropped", "failed", "stale_epoch"), 0
        )
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._start_diagnostics_timer()

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        """Declare every parameter; values given at start-up that are out of range, of the wrong type or
        refused by their check are collected into one StartupError naming each."""
        problems = []
        for p in PARAMS:
            if p.builtin:
                continue
            descriptor = ParameterDescriptor(description=p.description)
            if p.range is not None and isinstance(p.default, float):
                descriptor.floating_point_range = [
                    FloatingPointRange(from_value=p.range[0], to_value=p.range[1])
                ]
            elif p.range is not None and isinstance(p.default, int):
                descriptor.integer_range = [
                    IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]))
                ]
            # An empty list has no element type for rclpy: declare it as a string array without a value.
            default = Parameter.Type.STRING_ARRAY if p.default == [] else p.default
            try:
                self.declare_parameter(p.name, default, descriptor)
            except ParameterException as err:  # rclpy's range / type checks; its message names the value
                reason = str(err).split("Reason: ")[-1].removesuffix(f": {p.name}")
                problems.append(f"{p.name}: {reason}")
                continue
            reason = p.check(self.param(p.name))
            if reason:
                problems.append(f"{p.name}: {self.param(p.name)!r} {reason}")
        if problems:
            raise StartupError("; ".join(problems))

    def param(self, name: str):
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:
            return []  # an empty list parameter left unset

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
        if "rate_hz" in names and self._deadline_timer is not None:
            self._start_deadline_timer()
        if "diagnostics_rate_hz" in names:
            self.destroy_timer(self._diag_timer)
            self._start_diagnostics_timer()
        timing = names & ASSEMBLY_TIMING
        if timing:
            with self._lock:
                if self.assembler is not None:  # applied at once, as the help of each says
                    self.assembler.settings = dataclasses.replace(
                        self.assembler.settings, **{name: self.param(name) for name in timing}
                    )
        if self.scheduler is not None and names & {"control_period_s", "deadline_s"}:
            self.scheduler.period_s = self.param("control_period_s")
            self.scheduler.deadline_s = self.param("deadline_s")
            if self.steps_controller is not None:
                self.steps_controller.deadline_s = self.param("deadline_s")
        later = sorted(n for n in names if n in BY_NAME and BY_NAME[n].needs_reconfigure)
        if later and self.policy is not None:
            self.get_logger().info(f"{', '.join(later)} take effect at the next configure")

    # ------------------------------------------------------------------ life cycle
    def on_configure(self, state) -> TransitionCallbackReturn:
        """Parameters and the checkpoint's header are checked here (a mistake fails the transition); the
        weights are loaded and the graphs captured on a thread of their own, so the executor keeps serving
        parameters, lifecycle requests and diagnostics meanwhile. Readiness: phase "loading" -> "inactive"
        (or "serving", when activated meanwhile) in the diagnostics, and a "ready" log line."""
        try:
            config = self._configure()
        except Exception as err:  # noqa: BLE001 - a failed configure is reported and leaves the node unconfigured
            self._configure_error = err
            self.get_logger().error(f"configure failed: {err}")
            self._release()
            self.phase = f"failed: {err}"
            return TransitionCallbackReturn.FAILURE
        self.phase = "loading"
        self._loader = threading.Thread(target=self._load, args=(config,), name="vla-load", daemon=True)
        self._loader.start()
        return super().on_configure(state)

    def _load(self, config: RuntimeConfig) -> None:
        self.get_logger().info(f"loading {config.model_name} on {config.device} ({config.precision})")
        start = time.monotonic()
        try:
            policy = self._policy_factory(config)
        except Exception as err:  # noqa: BLE001 - reported; the node stays up (or exits under autostart)
            self.phase = f"failed: {err}"
            self.get_logger().error(f"loading failed: {err}")
            if self._exit_if_load_fails and not self.finished.done():
                self.finished.set_result(exit_code_of(err))
            return
        finally:
            self._exit_if_load_fails = False
        if policy.metadata.random_weights:
            self.get_logger().warning("no checkpoint: RANDOM WEIGHTS, the actions are meaningless")
        with self._lock:
            if self.phase != "loading":  # released meanwhile (process exit)
                policy.close()
                return
            self.policy = policy
            self._handover_mode = policy.metadata.handover
            self.phase = "serving" if self._active else "inactive"
        took = f"ready in {time.monotonic() - start:.1f} s"
        if hasattr(policy, "describe_startup"):  # the executor (a test's stand-in policy has none)
            took += f" ({policy.describe_startup()})"
        self.get_logger().info(f"{took}: {policy.metadata.model_id}")
        if self._active:
            self._log_serving()

    def runtime_config(self) -> RuntimeConfig:
        return runtime_config_from_params(self.param)

    def _configure(self) -> RuntimeConfig:
        config = self.runtime_config()
        cameras = list(self.param("cameras"))
        model_cameras = config.model.camera_names
        unknown = [c for c in cameras if c not in model_cameras]
        if unknown:
            raise ValueError(
                f"cameras: {unknown} are not cameras of {config.model_name} ({', '.join(model_cameras)})"
            )
        optional = config.optional_camera_names
        missing = [c for c in model_cameras if c not in cameras and c not in optional]
        if missing:
            raise ValueError(f"cameras: the model needs {missing}")
        state_joints = list(self.param("state_joint_names"))
        if state_joints and len(state_joints) != config.state_dim:
            raise ValueError(f"state_joint_names: {len(state_joints)} names for state_dim {config.state_dim}")
        self.scheduler = ChunkScheduler(self.param("control_period_s"), self.param("deadline_s"))
        self.steps_controller = (
            StepsController(config.denoising_steps, self.param("deadline_s"))
            if config.adaptive_steps
            else None
        )
        self.assembler = ObservationAssembler(
            AssemblySettings(
                required_cameras=tuple(c for c in cameras if c not in optional),
                optional_cameras=tuple(c for c in cameras if c in optional),
                sync_tolerance_s=self.param("sync_tolerance_s"),
                max_obs_age_s=self.param("max_obs_age_s"),
                max_future_s=self.param("max_future_s"),
            )
        )
        self.joint_names = config.action_names
        self._state_joint_names, self._state_dim = state_joints, config.state_dim
        if self.param("record_observations"):
            from ..runtime.recording import ObservationRecorder

            path = tagged_path(self.param("record_observations"), self._record_tag)
            self.recorder = ObservationRecorder(path, self.get_namespace())
        for name in cameras:
            topic = f"camera/{name}/image_raw"
            self._subscribe(
                Image,
                topic,
                lambda msg, name=name, topic=topic: self._on_image(name, topic, msg),
                qos_profile_sensor_data,
            )
        if self.param("state_msg_type") == "joint_state":
            self._subscribe(JointState, "joint_states", self._on_joint_state, 10)
        else:
            self._subscribe(Float32MultiArray, "joint_states", self._on_state_array, 10)
        self._subscribe(String, "instruction", self._on_instruction, 10)
        qos = QoSProfile(
            depth=self.param("action_queue_depth"),
            reliability=ReliabilityPolicy.RELIABLE
            if self.param("action_reliable")
            else ReliabilityPolicy.BEST_EFFORT,
        )
        self.chunk_pub = self.create_lifecycle_publisher(JointTrajectory, "action_chunk", qos)
        return config

    def _subscribe(self, msg_type, topic, callback, qos) -> None:
        self._subscriptions_made.append(self.create_subscription(msg_type, topic, callback, qos))

    def on_activate(self, state) -> TransitionCallbackReturn:
        if self.phase.startswith("failed"):
            self.get_logger().error(f"activate refused: {self.phase} (cleanup, fix, configure)")
            return TransitionCallbackReturn.FAILURE
        result = super().on_activate(state)
        self._start_deadline_timer()
        with self._lock:
            self._active = True
            loaded = self.policy is not None
            if loaded:
                self.phase = "serving"
        if loaded:
            self._log_serving()  # else once loading is done
        return result

    def _log_serving(self) -> None:
        self.get_logger().info(
            f"serving: chunks published as computed, deadline {self.param('deadline_s') * 1e3:.0f} ms, "
            f"watched at {self.param('rate_hz')} Hz"
        )

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._stop_deadline_timer()
        with self._lock:
            self._active = False
            if self.policy is not None:
                self.phase = "inactive"
        self._reset_serving_state()
        if self.policy is not None:
            try:
                self.policy.reset()
            except DeviceHung as err:  # deactivated all the same; diagnostics keep saying the device hangs
                self.get_logger().error(f"deactivate: {err}")
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        if self.phase == "loading":
            self.get_logger().error("cleanup refused while loading; try again once the node is ready")
            return TransitionCallbackReturn.FAILURE
        self._release()
        self.phase = "unconfigured"
        return super().on_cleanup(state)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._release()
        self.phase = "finalized"
        if not self.finished.done():
            self.finished.set_result(0)
        return super().on_shutdown(state)

    def _release(self, wait_for_loading: bool = True) -> None:
        """Stop serving, then release: the policy first (its completion thread may still publish), the
        publisher and subscriptions after. A load in progress cannot be interrupted: it is waited for, or
        (at process exit) left to its daemon thread."""
        self._stop_deadline_timer()
        if self._loader is not None and wait_for_loading:
            self._loader.join()
        self._loader = None
        with self._lock:
            self._active = False
            self._epoch += 1  # chunks still in flight are discarded
            self._handover_in_flight = 0
            self._in_flight.clear()
            policy, self.policy = self.policy, None
            if not self.phase.startswith("failed"):
                self.phase = "releasing"
        if policy is not None:
            policy.close()
        for sub in self._subscriptions_made:
            self.destroy_subscription(sub)
        self._subscriptions_made.clear()
        with self._publish_lock:
            if hasattr(self, "chunk_pub"):
                self.destroy_lifecycle_publisher(self.chunk_pub)
                del self.chunk_pub
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        with self._lock:
            self.scheduler = self.assembler = self.steps_controller = None

    def _start_deadline_timer(self) -> None:
        self._stop_deadline_timer()
        self._deadline_timer = self.create_timer(1.0 / self.param("rate_hz"), self._watch_deadlines)

    def _start_diagnostics_timer(self) -> None:
        # On the steady clock: a paused simulation (use_sim_time) must not silence the node's health.
        self._diag_timer = self.create_timer(
            1.0 / self.param("diagnostics_rate_hz"),
            self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )

    def _stop_deadline_timer(self) -> None:
        if self._deadline_timer is not None:
            self.destroy_timer(self._deadline_timer)
            self._deadline_timer = None

    def autostart(self) -> None:
        """Configure and activate from the executor (a one-shot timer), so that a long load does not hold
        the process before it spins; a failure ends the process with the reason."""

        def start():
            timer.cancel()
            self._exit_if_load_fails = True
            self._configure_error = None
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                self.get_logger().fatal(f"autostart: {self.phase}; exiting")
                self.finished.set_result(exit_code_of(self._configure_error or RuntimeError()))
                return
            self.trigger_activate()

        timer = self.create_timer(0.0, start)

    # ------------------------------------------------------------------ time
    def now(self) -> float:
        """The node's clock (ROS time: /clock under use_sim_time), in seconds. Going back by more than
        CLOCK_JUMP_S (a bag restarted, a simulator reset) resets what is buffered and scheduled."""
        with self._lock:  # read and compared under one lock: threads reading it see it in order
            now = self.get_clock().now().nanoseconds * 1e-9
            jumped = self._last_now is not None and now < self._last_now - CLOCK_JUMP_S
            self._last_now = now
        if jumped:
            with self._lock:
                self.counters["clock_jumps"] += 1
            self.get_logger().warning(f"the clock jumped back to {now:.3f}; buffered inputs and chunk reset")
            self._reset_serving_state()
        return now

    def _reset_serving_state(self) -> None:
        with self._publish_lock:
            self._newest_published = -math.inf  # a clock jump back: older stamps are new again
        with self._lock:
            self._epoch += 1
            self._handover_in_flight = 0
            self._in_flight.clear()
            if self.scheduler is not None:
                self.scheduler.reset()
            if self.assembler is not None:
                self.assembler.reset()

    # ------------------------------------------------------------------ inputs
    def _refuse(self, cause: str, where: str, err: Exception) -> None:
        with self._lock:
            self.counters[cause] += 1
        self._log_refusal(f"{where}: {err}")

    def _log_refusal(self, text: str) -> None:
        """Log a refused input, at most once per LOG_THROTTLE_S for each cause (the message without its
        numbers), so one flooding cause does not hide another."""
        cause = re.sub(r"[-+]?\d[\d.e+-]*", "#", text)
        now = time.monotonic()
        with self._lock:
            if now - self._last_logged.get(cause, -LOG_THROTTLE_S) < LOG_THROTTLE_S:
                return
            self._last_logged[cause] = now
        self.get_logger().error(f"{text}; input dropped")

    def _store(self, where: str, camera: str | None, convert) -> None:
        """Convert a message (an image of `camera`, or the state when None) and hand it to the assembler;
        then serve the observation it may complete."""
        arrived = time.perf_counter()
        try:
            value, stamp = convert()
        except ValueError as err:
            return self._refuse("bad_inputs", where, err)
        now = self.now()
        with self._lock:
            if self.assembler is None:
                return
            try:
                if camera is None:
                    self.assembler.add_state(value, stamp, now)
                else:
                    self.assembler.add_image(camera, value, stamp, now)
            except InputRefused as err:
                self.counters[err.cause] += 1
                refused = err
            else:
                refused = None
        if refused is not None:
            self._log_refusal(f"{where}: {refused}")
            return
        self._serve(now, arrived)

    def _on_image(self, name: str, topic: str, msg: Image) -> None:
        self._store(topic, name, lambda: (image_to_rgb(msg), stamp_to_seconds(msg.header.stamp)))

    def _on_joint_state(self, msg: JointState) -> None:
        names, dim = self._state_joint_names, self._state_dim  # as configured
        self._store(
            "joint_states",
            None,
            lambda: (
                state_from_joint_state(msg.name, msg.position, names, dim),
                stamp_to_seconds(msg.header.stamp),
            ),
        )

    def _on_state_array(self, msg: Float32MultiArray) -> None:
        # Float32MultiArray has no header: it is stamped on arrival.
        self._store(
            "joint_states",
            None,
            lambda: (state_vector(msg.data, self._state_dim, "data"), self.now()),  # as configured
        )

    def _on_instruction(self, msg: String) -> None:
        if not msg.data.strip():
            return self._refuse("bad_inputs", "instruction", ValueError("data: empty instruction"))
        preparer = getattr(getattr(self.policy, "parts", None), "preparer", None)
        if preparer is not None:
            try:  # too long for the prompt whatever the state: refused here, the last instruction kept
                preparer.check_instruction(msg.data)
            except ValueError as err:
                return self._refuse("bad_inputs", "instruction", err)
        with self._lock:
            if self.assembler is not None:
                self.assembler.set_instruction(msg.data)
        self._serve(self.now())  # the first instruction may complete an observation

    # ------------------------------------------------------------------ serving
    def _serve(self, now: float, arrived: float | None = None) -> None:
        """Submit the newest complete observation, if there is one not served before. `arrived`: when the
        message that completed it reached this node (perf_counter), for the node's own time in."""
        with self._lock:
            if self.phase != "serving" or self.assembler is None or self.policy is None:
                return
            if self.steps_controller is not None and self._in_flight:
                stamp, steps = min(self._in_flight.values())  # the oldest frame still on its way
                self.steps_controller.overdue(now - stamp, steps)
            # A hand-over mode joins each chunk to the one before it, so a frame goes to the policy only
            # once the previous one is answered (real-time chunking's loop): submitted earlier, it would be
            # joined to the chunk before that. The newest observation waits in the assembler meanwhile.
            handing_over = self.scheduler is not None and self._handover_mode != "switch"
            if handing_over and self._handover_in_flight:
                return
            obs = self.assembler.take(now)
            if obs is None:
                return
            epoch, policy, scheduler, controller = (
                self._epoch,
                self.policy,
                self.scheduler,
                self.steps_controller,
            )
            self._handover_in_flight += handing_over
        # The executing chunk's remaining actions and the expected delay, for the hand-over mode.
        previous = scheduler.previous_chunk(obs.timestamp) if handing_over else None
        hand_over = {"previous": previous} if previous is not None else {}
        try:
            steps = controller.steps if controller is not None else self.param("steps") or None
            future = policy.submit(obs, steps=steps, **hand_over)
        except (ValueError, ExecutorClosed) as err:
            with self._lock:
                if epoch == self._epoch:
                    self._handover_in_flight -= handing_over
            if isinstance(err, ExecutorClosed):
                return  # released meanwhile
            return self._refuse("refused", "observation", err)  # e.g. an instruction too long
        with self._lock:
            if epoch != self._epoch or self.scheduler is None:
                return  # reset meanwhile (a clock jump): its chunk will be discarded
            self.scheduler.observed(obs.timestamp)
        if arrived is not None:
            self.spans.add("node_in", (time.perf_counter() - arrived) * 1e3)
        if self.recorder is not None:
            self.recorder.write(obs)  # what was served, for `vla-runtime calibrate`
        if controller is not None:
            with self._lock:
                if epoch == self._epoch:
                    self._in_flight[id(future)] = (obs.timestamp, steps)
        future.add_done_callback(lambda f: self._on_chunk(f, epoch))

    def _on_chunk(self, future, epoch: int) -> None:
        """The policy's completion thread: publish the chunk at once; in a hand-over mode, then submit the
        observation that waited for it."""
        with self._lock:
            handing_over = epoch == self._epoch and self._handover_in_flight > 0
            self._handover_in_flight -= handing_over
            self._in_flight.pop(id(future), None)
        try:
            self._take_chunk(future, epoch)
        finally:
            if handing_over:
                self._serve(self.now())

    def _take_chunk(self, future, epoch: int) -> None:
        err = future.exception()
        if err is not None:
            cause = "dropped" if isinstance(err, FrameDropped) else "failed"
            with self._lock:
                self.counters[cause] += 1
            if cause == "failed":
                self.get_logger().error(f"inference failed: {err}", throttle_duration_sec=LOG_THROTTLE_S)
            return
        chunk: ActionChunk = future.result()
        ready = time.perf_counter()
        now = self.now()
        with self._lock:
            if epoch != self._epoch or self.scheduler is None:
                self.counters["stale_epoch"] += 1  # observed before a reset (clock jump, deactivate)
                return
            scheduled = self.scheduler.offer(chunk, now)
            controller = self.steps_controller
        if controller is not None:  # every chunk's age is evidence, published or not (late, expired)
            controller.observe(now - chunk.timestamp, chunk.steps, chunk.timings_ms.get("denoise"))
        if scheduled is not None and self.phase == "serving":
            self._publish(scheduled)
            self.spans.add("node_out", (time.perf_counter() - ready) * 1e3)

    def _watch_deadlines(self) -> None:
        now = self.now()
        self._serve(now)  # an observation complete by time alone: an optional camera just declared dead
        with self._lock:
            if self.scheduler is None:
                return
            tail = self.scheduler.check(now)
            stale = self.assembler.waiting_for == "stale"
            if stale:
                self.counters["stale_inputs"] += 1
        if stale:
            self.get_logger().warning(
                f"stale inputs: nothing newer than max_obs_age_s {self.param('max_obs_age_s')} s",
                throttle_duration_sec=LOG_THROTTLE_S,
            )
        if tail is not None and self.phase == "serving":
            self._publish(tail)

    def _publish(self, scheduled: ScheduledActions) -> None:
        """Publish as a JointTrajectory: header.stamp = the observation's time, point k at k periods.
        Serialized by `cdr.joint_trajectory` (rclpy's per-point conversion cost ~0.5 ms of Python); one
        publication at a time, since the completion thread and the deadline watch both publish."""
        period_ns = round(self.scheduler.period_s * 1e9)
        first, rows = scheduled.first_index, scheduled.actions
        stamp = seconds_to_stamp(scheduled.chunk.timestamp, Time)
        data = cdr.joint_trajectory(
            stamp.sec,
            stamp.nanosec,
            "",
            self.joint_names,
            rows,
            period_ns * np.arange(first, first + len(rows)),
        )
        with self._publish_lock:
            # The deadline watch may have decided on a tail of an older chunk just before a fresh one was
            # published: never send the robot an older observation's actions after a newer one's.
            if scheduled.chunk.timestamp < self._newest_published:
                return
            self._newest_published = scheduled.chunk.timestamp
            if hasattr(self, "chunk_pub"):  # else released meanwhile
                self.chunk_pub.publish(data)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict:
        """The deadline figures (scheduler), input refusals (node) and the engine's own latency (policy)."""
        with self._lock:
            values = dict(self.counters)
            figures = self.scheduler.figures() if self.scheduler is not None else {}
            if self.steps_controller is not None:
                figures.update(self.steps_controller.figures())
            waiting_for = self.assembler.waiting_for if self.assembler is not None else ""
        health = self.policy.health() if self.policy is not None else {"latency_ms": {}}
        values.update(figures)
        values["waiting_for"] = waiting_for
        for key, value in health.get("robot", {}).items():  # a fleet's server: this robot's own figures
            values[f"server_{key}"] = round(value, 3) if isinstance(value, float) else value
        values["policy_state"] = health.get("state", "")
        values["policy_error"] = health.get("error", "")
        if self.policy is not None:
            metadata = self.policy.metadata
            values["model_id"], values["random_weights"] = metadata.model_id, metadata.random_weights
        # Graphs captured (at start, then one set per new shape met while serving: a stall of the device)
        # and frames run in a larger shape (capture_new_shapes false): the engine's, where it counts them.
        for key in ("captures", "larger_shape"):
            if key in health.get("counters", {}):
                values[f"engine_{key}"] = health["counters"][key]
        for stage in ("vision", "prefix", "denoise", "total"):
            s = health["latency_ms"].get(stage)
            if s:
                values[f"engine_{stage}_p50_ms"] = round(s["p50"], 3)
                values[f"engine_{stage}_p99_ms"] = round(s["p99"], 3)
        for span, s in self.spans.summary().items():
            values[f"{span}_p50_ms"], values[f"{span}_p99_ms"] = round(s["p50"], 3), round(s["p99"], 3)
        for key in ("age_p50_ms", "age_p99_ms"):
            if key in values:
                values[key] = round(values[key], 3)
        return values

    def _level(self, values: dict) -> tuple[int, str]:
        """Level and message from the deadline figures since the previous report."""
        if self.phase.startswith("failed"):
            return DiagnosticStatus.ERROR, self.phase
        if self.phase != "serving":
            return DiagnosticStatus.OK, self.phase
        if values["policy_state"] not in ("serving", ""):
            return DiagnosticStatus.ERROR, f"policy {values['policy_state']}: {values['policy_error']}"
        previous, self._reported = getattr(self, "_reported", {}), values
        since = {k: values.get(k, 0) - previous.get(k, 0) for k in ("observations", "misses", "stale_inputs")}
        refusals = sum(values[k] - previous.get(k, 0) for k in REFUSAL_CAUSES)
        if since["misses"]:
            return DiagnosticStatus.WARN, f"deadline missed for {since['misses']} of {since['observations']}"
        if since["stale_inputs"]:
            return DiagnosticStatus.WARN, "stale inputs"
        if refusals:
            return DiagnosticStatus.WARN, f"{refusals} inputs refused"
        if not since["observations"]:
            return DiagnosticStatus.WARN, f"no observations ({values['waiting_for'] or 'waiting'})"
        return DiagnosticStatus.OK, f"serving, chunk age p50 {values.get('age_p50_ms', float('nan')):.1f} ms"

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics()
        level, message = self._level(values)
        metadata = self.policy.metadata if self.policy is not None else None
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_fully_qualified_name()}: policy",
            message=message,
            hardware_id=metadata.model_id if metadata else "",
            values=[KeyValue(key="phase", value=self.phase)]
            + [KeyValue(key=k, value=str(v)) for k, v in values.items()],
        )
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)


def main(args: list[str] | None = None, policy_factory=PipelinedExecutor) -> int:
    """`ros2 run vla_runtime policy_node` / `vla-runtime node`: exit 0 on Ctrl-C or a shutdown transition,
    2 for bad start-up parameters or arguments (also when autostart's configure or load refuses one), 1
    when autostart's start fails otherwise (the device, memory)."""
    try:
        command_line_parameters(
            sys.argv if args is None else args, warn=lambda w: print(f"policy_node: {w}", file=sys.stderr)
        )
        rclpy.init(args=args)
    except Exception as err:  # noqa: BLE001 - ours, and rcl's own errors (a missing params file), as one line
        print(f"policy_node: {start_up_error(err)}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    node = None
    try:
        node = PolicyNode(policy_factory=policy_factory)
        if node.param("autostart"):
            node.autostart()
        # One thread: rclpy's multi-threaded executor contends for the GIL with the policy's own threads
        # (measured on 2 CPU cores: the engine's p50 from 12 ms to 98 ms); loading runs on its own thread.
        executor = rclpy.executors.SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin_until_future_complete(node.finished)
        return node.finished.result() if node.finished.done() else 0
    except StartupError as err:
        print(f"policy_node: bad parameters: {err}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        return 0
    finally:
        if node is not None:
            node._release(wait_for_loading=False)
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    sys.exit(main())
