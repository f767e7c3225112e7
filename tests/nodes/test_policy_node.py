"""The policy node with real rclpy across processes (the node in its own process, a fake robot here).

Nothing here asserts a rate or a duration: events are counted (a chunk per observation, the node's
counters), and where a test needs the timer out of the way it sets the deadline watch to 1 Hz with a
10 s deadline, so any chunk that arrives was published by the completion path. Control periods of 1 s
keep a chunk's first action valid for 1 s and the chunk for 10: a loaded machine changes no outcome."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from .harness import JOINTS, PolicyNodeProcess, Robot, header_seconds, point_seconds  # noqa: I001  (sets ROS env first)

ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
ALL_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
PERIOD = 1.0
# the deadline watch never publishes a tail; a chunk's actions stay valid for seconds
QUIET_TIMER = ("rate_hz:=1.0", "deadline_s:=10.0", f"control_period_s:={PERIOD}")


@pytest.fixture(scope="module")
def robot():
    r = Robot(image_side=32)
    yield r
    r.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory, robot):
    proc = PolicyNodeProcess(tmp_path_factory.mktemp("node"), "preset:=pi05_tiny", "steps:=2", *QUIET_TIMER)
    assert proc.wait_for_log("serving:", 120), proc.text()
    assert robot.first_chunk() is not None, proc.text()
    yield proc
    proc.stop()


def latest_diag(robot, key=None, message=None):
    diags = [
        d
        for d in robot.diagnostics
        if (key is None or key in d) and (message is None or message in d["message"])
    ]
    return diags[-1] if diags else None


def wait_diag(robot, predicate, timeout=10.0):
    return robot.wait_for(lambda: any(predicate(d) for d in list(robot.diagnostics)), timeout)


def test_every_observation_is_answered_by_completion_not_by_the_timer(node, robot):
    """Observations one after the other: each the node forms gets its own chunk, stamped with its time,
    although the deadline watch runs at 1 Hz and never has a deadline to act on (no tails); the first action
    of each chunk is the one whose period contains its arrival (nothing valid cut, nothing expired sent).
    Camera images travel best effort (sensor-data QoS), so an observation may be lost on the way; the
    node's own counters show that every observation it formed was answered."""
    answered = []
    for _ in range(12):
        stamp = robot.publish_once()
        got = robot.chunk_for(stamp, timeout=30.0)
        if got is not None:
            answered.append((stamp, *got))
    assert len(answered) >= 9, node.text()[-2000:]
    for stamp, arrival, msg in answered:
        assert list(msg.joint_names) == ACTION_NAMES and 1 <= len(msg.points) <= 10  # pi05_tiny: horizon 10
        assert all(len(p.positions) == 7 and np.isfinite(p.positions).all() for p in msg.points)
        times = [point_seconds(p) for p in msg.points]
        assert np.allclose(np.diff(times), PERIOD, atol=1e-6)  # one point per control period
        assert times[0] <= arrival - stamp + 1e-6  # never cut beyond its age: the action due on arrival is in
    assert wait_diag(robot, lambda d: int(d.get("fresh", 0)) >= len(answered) + 1)  # + the fixture's
    diag = latest_diag(robot, "fresh")
    assert diag["fresh"] == diag["observations"] and diag["tails"] == "0" and diag["misses"] == "0"
    assert diag["exhausted"] == "0"  # no chunk arrived with all its actions expired
    assert {"age_p50_ms", "engine_total_p50_ms", "dropped", "refused"} <= set(diag)
    assert diag["engine_larger_shape"] == "0" and "engine_captures" in diag


BAD_INPUTS = [
    (
        "image",
        "camera/base_0_rgb/image_raw: encoding",
        lambda s: Image(header=_h(s), height=4, width=4, encoding="mono8", step=4, data=bytes(16)),
    ),
    (
        "image",
        "camera/base_0_rgb/image_raw: data",
        lambda s: Image(header=_h(s), height=4, width=4, encoding="rgb8", step=12, data=bytes(10)),
    ),
    (
        "state",
        "joint_states: position: 3 values",
        lambda s: JointState(header=_h(s), position=[0.0, 1.0, 2.0]),
    ),
    (
        "state",
        "joint_states: position: non-finite",
        lambda s: JointState(header=_h(s), position=[math.nan] * 8),
    ),
    ("instruction", "instruction: data: empty", lambda s: String(data="   ")),
    (
        "instruction",
        "instruction: the prompt is at least",  # refused on arrival; the previous instruction stays
        lambda s: String(data="pick up the bowl " * 300),
    ),
]


def _h(stamp):
    from std_msgs.msg import Header

    return Header(stamp=stamp)


@pytest.mark.parametrize("kind, expected, make", BAD_INPUTS, ids=[b[1].split(": ", 1)[1] for b in BAD_INPUTS])
def test_bad_input_is_logged_counted_and_the_next_observation_served(node, robot, kind, expected, make):
    before = int((latest_diag(robot, "bad_inputs") or {"bad_inputs": 0})["bad_inputs"])
    robot.sabotage = {"kind": kind, "make": make}
    try:
        robot.publish_once()
        assert node.wait_for_log(expected, 10), node.text()[-2000:]
    finally:
        robot.sabotage = None
    assert robot.chunk_for(robot.publish_once()) is not None  # still serving
    assert wait_diag(robot, lambda d: int(d.get("bad_inputs", 0)) > before)


def _set_parameter(robot, name, value: float, node_name="/policy_node"):
    client = robot.node.create_client(SetParameters, f"{node_name}/set_parameters")
    assert client.wait_for_service(10)
    request = SetParameters.Request(
        parameters=[
            Parameter(
                name=name, value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
            )
        ]
    )
    result = _call(robot, client, request)
    robot.node.destroy_client(client)
    return result.results[0]


def _call(robot, client, request, timeout=60.0):
    future = client.call_async(request)
    assert robot.wait_for(future.done, timeout)
    return future.result()


def test_parameters_are_validated_on_set(node, robot):
    refused = _set_parameter(robot, "rate_hz", 1000.0)
    assert not refused.successful and "rate_hz" in refused.reason
    assert _set_parameter(robot, "max_obs_age_s", 0.4).successful
    assert robot.chunk_for(robot.publish_once()) is not None  # still serving


def test_stopped_inputs_are_reported_and_nothing_is_published(node, robot):
    assert robot.chunk_for(robot.publish_once()) is not None
    seen, reports = len(robot.chunks), len(robot.diagnostics)
    stale_before = int(latest_diag(robot, "stale_inputs")["stale_inputs"])

    def newly_stale():  # a report after the last input, counting stale inputs the earlier ones did not
        return [
            d
            for d in list(robot.diagnostics)[reports:]
            if d["message"] == "stale inputs" and int(d["stale_inputs"]) > stale_before
        ]

    assert robot.wait_for(lambda: len(newly_stale()) >= 2, 30)
    assert len(robot.chunks) == seen  # no observation, no chunk (and no tail: no deadline to miss)


def test_a_slow_policy_counts_misses_and_publishes_the_tail(tmp_path):
    """Every chunk takes 80 ms more than its 50 ms deadline: the deadline watch counts the misses and sends
    the current chunk's tail, whose passed actions are cut; diagnostics say so. With adaptive steps the node
    steps down from 3 to 2 denoising steps (which does not help this device: its slowness is not in the
    steps) and the chunks say which they were made with. With the inpaint hand-over an observation goes
    to the policy only once the previous one is answered: nothing is ever replaced in the executor,
    although the robot publishes every 50 ms and a chunk takes 80."""
    r = Robot(namespace="/slow")
    proc = PolicyNodeProcess(
        tmp_path,
        "preset:=pi05_tiny",
        "steps:=3",
        "adaptive_steps:=true",
        "handover:=inpaint",
        namespace="/slow",
        script=Path(__file__).with_name("slow_policy_node.py"),
    )
    try:
        assert proc.wait_for_log("serving:", 120), proc.text()
        r.publishing.set()
        assert wait_diag(r, lambda d: int(d.get("misses", 0)) > 5 and int(d.get("tails", 0)) > 0, 30), (
            proc.text()[-2000:]
        )
        assert wait_diag(r, lambda d: d["level"] == 1 and d["message"].startswith("deadline missed"))
        assert wait_diag(
            r,
            lambda d: d.get("steps_down") == "1" and d.get("adaptive_steps") == "2" and d.get("steps") == "2",
        ), latest_diag(r, "fresh")
        assert wait_diag(r, lambda d: int(d.get("fresh", 0)) > 10)
        diag = latest_diag(r, "fresh")
        assert diag["dropped"] == "0" and diag["handover"] == "inpaint", diag
    finally:
        proc.stop()
        r.close()


def test_sim_time_clock_jumps_and_future_stamps(tmp_path):
    """use_sim_time: the node runs on /clock. A chunk on a stopped clock starts exactly at its first action;
    the clock jumping back (a restarted bag) resets the node instead of refusing every new chunk as late;
    an observation stamped in the future is refused and counted. With the rtc hand-over, so the second
    chunk is guided toward the first; the diagnostics show the mode, the expected delay and the steps."""
    r = Robot(namespace="/sim")
    proc = PolicyNodeProcess(
        tmp_path, "preset:=pi05_tiny", "steps:=2", "use_sim_time:=true", "handover:=rtc", namespace="/sim"
    )
    try:
        assert proc.wait_for_log("serving:", 120), proc.text()
        for t in (100.0, 100.25, 5.0):  # the third goes back in time
            got = r.first_chunk(t, clock=True)  # /clock first: the node's time must be there before
            assert got is not None, (t, proc.text()[-3000:])
            assert point_seconds(got[1].points[0]) == 0.0 and len(got[1].points) == 10  # exact alignment
        assert proc.wait_for_log("the clock jumped back to 5.000", 10)
        assert wait_diag(r, lambda d: int(d.get("clock_jumps", 0)) == 1)
        assert wait_diag(
            r,
            lambda d: (
                d.get("handover") == "rtc"
                and d.get("steps") == "2"
                and d.get("expected_delay_steps") == "0"  # sim time stands still while a chunk is computed
                and d.get("frozen_steps") == "0"
            ),
        ), latest_diag(r, "fresh")
        refused_before = int(latest_diag(r, "future_stamps")["future_stamps"])
        r.publish_once(5.5)  # 0.5 s ahead of the node's clock (max_future_s 0.1)
        # at least one of its messages is refused (the images travel best effort); counted, not logged
        # again (the first tries of first_chunk, before the node had /clock, logged this cause already)
        assert wait_diag(r, lambda d: int(d.get("future_stamps", 0)) >= refused_before + 1)
        assert not any(abs(header_seconds(m) - 5.5) < 1e-6 for _, m in list(r.chunks))
    finally:
        proc.stop()
        r.close()


def test_a_dead_optional_camera_is_masked_and_joint_state_is_read_by_name(tmp_path):
    """Three cameras, the right wrist optional; it stops publishing. Serving goes on without it once it is
    max_obs_age_s silent; the recording of what was served shows it left out. The state is read by joint
    name (the robot sends the joints in reverse order) and a message missing a joint is refused."""
    recording = tmp_path / "served.mcap"
    r = Robot(namespace="/cams", cameras=ALL_CAMERAS)
    proc = PolicyNodeProcess(
        tmp_path,
        "preset:=pi05_tiny",
        "steps:=2",
        "max_obs_age_s:=0.5",
        f"state_joint_names:={JOINTS}",
        f"record_observations:={recording}",
        *QUIET_TIMER,
        namespace="/cams",
    )
    try:
        assert proc.wait_for_log("serving:", 120), proc.text()
        assert r.first_chunk() is not None, proc.text()[-2000:]
        r.silent_cameras.add("right_wrist_0_rgb")
        died = r.now()
        r.publishing.set()
        assert r.wait_for(lambda: any(header_seconds(m) > died + 0.6 for _, m in list(r.chunks)), 20), (
            proc.text()[-2000:]
        )
        r.publishing.clear()
        r.joint_names = JOINTS[1:]  # joint_0 missing (and one value short)
        r.publish_once()
        assert proc.wait_for_log("name: joints ['joint_0'] are not in the message", 10), proc.text()[-2000:]
    finally:
        assert proc.stop() == 0
        r.close()
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    with open(recording, "rb") as f:
        messages = [
            (c.topic, m.log_time * 1e-9, d)
            for _, c, m, d in make_reader(f, decoder_factories=[DecoderFactory()]).iter_decoded_messages()
        ]
    served_after = {
        t for topic, t, _ in messages if topic.endswith("base_0_rgb/image_raw") and t > died + 0.6
    }
    right_after = [
        t for topic, t, _ in messages if topic.endswith("right_wrist_0_rgb/image_raw") and t > died
    ]
    assert served_after and not right_after  # served without the dead camera, not with its stale image
    states = [list(d.position) for topic, _, d in messages if topic.endswith("joint_states")]
    assert states and all(s == [float(i) for i in range(8)] for s in states)  # by name, not by index


def _transition(robot, node_name, transition_id):
    client = robot.node.create_client(ChangeState, f"{node_name}/change_state")
    assert client.wait_for_service(10)
    result = _call(robot, client, ChangeState.Request(transition=Transition(id=transition_id)), 120)
    robot.node.destroy_client(client)
    return result.success


def _state(robot, node_name):
    client = robot.node.create_client(GetState, f"{node_name}/get_state")
    assert client.wait_for_service(10)
    label = _call(robot, client, GetState.Request()).current_state.label
    robot.node.destroy_client(client)
    return label


def assert_not_served(r: Robot) -> None:
    """An observation published while inactive: two diagnostics reports later (the node has had it), its
    observation count has not moved and no chunk answers it."""
    since = len(r.diagnostics)  # a report from after the transition
    assert r.wait_for(lambda: any(d["phase"] == "inactive" for d in list(r.diagnostics)[since:]), 30)
    before = latest_diag(r)
    reports = len(r.diagnostics)
    stamp = r.publish_once()
    assert r.wait_for(lambda: len(r.diagnostics) >= reports + 2, 30)
    after = latest_diag(r)
    assert after["phase"] == "inactive" and after.get("observations") == before.get("observations")
    assert r.chunk_for(stamp, timeout=0.0) is None


def test_lifecycle_transitions(tmp_path):
    r = Robot(namespace="/life")
    name = "/life/policy_node"
    proc = PolicyNodeProcess(tmp_path, "preset:=pi05_tiny", "steps:=2", "autostart:=false", namespace="/life")
    try:
        assert r.wait_for(lambda: latest_diag(r) is not None, 30), proc.text()
        assert latest_diag(r)["phase"] == "unconfigured" and _state(r, name) == "unconfigured"
        assert _transition(r, name, Transition.TRANSITION_CONFIGURE) and _state(r, name) == "inactive"
        assert_not_served(r)  # configured, not serving
        assert _transition(r, name, Transition.TRANSITION_ACTIVATE) and _state(r, name) == "active"
        assert r.first_chunk() is not None
        assert _transition(r, name, Transition.TRANSITION_DEACTIVATE) and _state(r, name) == "inactive"
        assert_not_served(r)
        assert _transition(r, name, Transition.TRANSITION_ACTIVATE)
        assert r.chunk_for(r.publish_once()) is not None  # serving again after re-activation
        assert _transition(r, name, Transition.TRANSITION_DEACTIVATE)
        assert _transition(r, name, Transition.TRANSITION_CLEANUP) and _state(r, name) == "unconfigured"
        client = r.node.create_client(SetParameters, f"{name}/set_parameters")
        assert client.wait_for_service(10)
        bad_cameras = Parameter(
            name="cameras",
            value=ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=["top_cam"]),
        )
        assert _call(r, client, SetParameters.Request(parameters=[bad_cameras])).results[0].successful
        assert not _transition(r, name, Transition.TRANSITION_CONFIGURE)  # a failing configure
        assert _state(r, name) == "unconfigured"
        assert wait_diag(r, lambda d: d["level"] == 2 and "top_cam" in d["message"])
        assert _transition(r, name, Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert proc.proc.wait(30) == 0  # a shutdown transition ends the process
    finally:
        proc.stop()
        r.close()


def test_autostart_with_a_failing_configure_exits_with_the_reason(tmp_path):
    proc = PolicyNodeProcess(
        tmp_path,
        "preset:=pi05_tiny",
        "cameras:=['base_0_rgb','left_wrist_0_rgb','top_cam']",
        namespace="/unknown_camera",
    )
    assert proc.proc.wait(120) == 2  # a camera refused: the user's mistake
    assert "cameras: ['top_cam'] are not cameras of pi05_tiny" in proc.text()
    proc.stop()


def test_bad_start_up_parameters_exit_2_without_a_traceback():
    for args, expected in (
        (
            ["-p", "steps:=50", "-p", "precision:=fp4"],
            ["bad parameters: steps:=50: must be in [1, 10]", "precision:=fp4: must be one of"],
        ),
        (["--params-file", "/nonexistent/policy.yaml"], ["Couldn't parse params file"]),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "vla_runtime", "node", "--ros-args", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, run.stderr
        assert all(e in run.stderr for e in expected) and "Traceback" not in run.stderr, run.stderr


def test_a_checkpoint_sets_the_horizon_and_n_action_steps_what_the_robot_gets(tmp_path):
    """A pi05_libero-style checkpoint (horizon 6 here, state-free prompt) served by the node; n_action_steps
    of 4 is what each chunk offers the robot. A checkpoint without statistics needs allow_unnormalized."""
    import shutil

    from vla_runtime.graphs.config import get_preset
    from vla_runtime.graphs.tokenizer import demo_tokenizer_path
    from vla_runtime.graphs.weights import build_model, save_checkpoint

    model = build_model(get_preset("pi05_tiny").replace(action_horizon=6), seed=2)
    ckpt = save_checkpoint(
        model, tmp_path / "pi05_libero_tiny", "lerobot", config_overrides={"n_action_steps": 4}
    )
    shutil.copy(demo_tokenizer_path(), ckpt / "tokenizer.model")
    refused = PolicyNodeProcess(tmp_path, f"checkpoint:={ckpt}", namespace="/no_stats")
    assert (
        refused.proc.wait(120) == 2 and "has no normalisation statistics" in refused.text()
    )  # refused: exit 2
    refused.stop()
    r = Robot(namespace="/horizon")
    # Actions 1 s apart: the chunk lands within the first action's period, so all n_action_steps = 4 of
    # it are offered (the horizon's 6 would give 6).
    proc = PolicyNodeProcess(
        tmp_path,
        f"checkpoint:={ckpt}",
        "allow_unnormalized:=true",
        *QUIET_TIMER,
        namespace="/horizon",
    )
    try:
        assert proc.wait_for_log("serving:", 120), proc.text()
        got = [r.first_chunk() for _ in range(3)]
        assert all(g is not None for g in got), proc.text()[-2000:]
        assert {len(m.points) for _, m in got} == {4}
    finally:
        proc.stop()
        r.close()


def test_installed_into_the_ament_index():
    from ament_index_python.packages import get_package_prefix, get_package_share_directory

    share = Path(get_package_share_directory("vla_runtime"))
    assert (share / "package.xml").is_file() and "<name>vla_runtime</name>" in (
        share / "package.xml"
    ).read_text()
    assert (share / "launch" / "policy.launch.py").is_file()
    assert (share / "config" / "policy.yaml").is_file()
    executable = Path(get_package_prefix("vla_runtime")) / "lib" / "vla_runtime" / "policy_node"
    assert executable.is_file() and os.access(executable, os.X_OK)
    assert Path(sys.prefix) == Path(get_package_prefix("vla_runtime"))


def test_launch_file_structure():
    """Checked without importing launch_ros (not installable here): the real API's names, an argument per
    node parameter generated from the one parameter table, the YAML first and only given arguments after."""
    from ament_index_python.packages import get_package_share_directory

    path = Path(get_package_share_directory("vla_runtime")) / "launch" / "policy.launch.py"
    tree = ast.parse(path.read_text())
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {
        ("launch", "LaunchDescription"),
        ("launch.actions", "DeclareLaunchArgument"),
        ("launch.actions", "OpaqueFunction"),
        ("launch.substitutions", "LaunchConfiguration"),
        ("launch_ros.actions", "Node"),
        ("vla_runtime.nodes.params", "PARAMS"),
        ("vla_runtime.nodes.params", "launch_overrides"),
    } <= imports
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    declare = [
        c
        for c in ast.walk(tree)
        if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "DeclareLaunchArgument"
    ]
    literal = {c.args[0].value for c in declare if isinstance(c.args[0], ast.Constant)}
    assert {"namespace", "params_file"} <= literal
    generated = [c for c in declare if isinstance(c.args[0], ast.Attribute) and c.args[0].attr == "name"]
    assert generated, "one DeclareLaunchArgument per PARAMS entry"
    node_call = next(
        c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "Node"
    )
    kwargs = {k.arg: k.value for k in node_call.keywords}
    assert kwargs["package"].value == "vla_runtime" and kwargs["executable"].value == "policy_node"
    assert {"namespace", "parameters", "name"} <= set(kwargs)
    parameters = kwargs["parameters"].elts
    assert ast.unparse(parameters[0]) == "LaunchConfiguration('params_file')"
    assert ast.unparse(parameters[1]) == "launch_overrides(given)"


def test_a_transition_by_id_that_the_state_lacks_is_refused_and_the_node_serves_on(node, robot):
    """ChangeState by id (as `ros2 service call` and lifecycle managers send it) for a transition the
    current state does not have: answered success=False, the node still serving (rclpy's own handling
    raised in the spin and ended the process)."""
    assert not _transition(robot, "/policy_node", Transition.TRANSITION_CLEANUP)  # active: no cleanup
    assert not _transition(robot, "/policy_node", Transition.TRANSITION_CONFIGURE)
    assert node.proc.poll() is None and _state(robot, "/policy_node") == "active"
    assert node.wait_for_log("transition 2 is not available in state active", 10)
    assert robot.chunk_for(robot.publish_once()) is not None


def test_timing_parameters_apply_while_serving(node, robot):
    """max_future_s set live: an observation stamped 1 s ahead, refused under the default 0.1 s, is
    served once it is 5 s (the parameter's help says it applies; it used to wait for a configure)."""
    ahead = robot.now() + 1.0
    robot.publish_once(ahead)
    assert node.wait_for_log("more than max_future_s 0.1", 10)
    assert _set_parameter(robot, "max_future_s", 5.0).successful
    try:
        assert robot.chunk_for(robot.publish_once(robot.now() + 1.0)) is not None
    finally:
        assert _set_parameter(robot, "max_future_s", 0.1).successful


def test_a_failed_load_ends_the_process_only_for_autostarts_own_load():
    """Under autostart the node exits when its start-up load fails; a load after a later, manual
    configure (a new checkpoint that does not load, say) fails that configure and leaves the node up (in
    a fleet it ended every robot's serving)."""
    import rclpy
    from vla_runtime.nodes.policy_node import EXIT_BAD_PARAMETERS, EXIT_CONFIGURE_FAILED, PolicyNode
    from vla_runtime.runtime.config import RuntimeConfig

    def refused(config):
        raise ValueError("checkpoint: no model.safetensors")

    def out_of_memory(config):
        raise RuntimeError("CUDA out of memory")

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = PolicyNode(policy_factory=refused, context=context)
        config = RuntimeConfig(preset="pi05_tiny")
        node._load(config)  # a manual configure's load
        assert not node.finished.done() and node.phase.startswith("failed: checkpoint")
        node._exit_if_load_fails = True  # as autostart sets it before its configure
        node._load(config)
        assert node.finished.result() == EXIT_BAD_PARAMETERS  # the user's mistake: exit 2
        node.destroy_node()
        broken = PolicyNode(policy_factory=out_of_memory, context=context)
        broken._exit_if_load_fails = True
        broken._load(config)
        assert broken.finished.result() == EXIT_CONFIGURE_FAILED  # not a mistake of the user's: exit 1
        broken.destroy_node()
    finally:
        rclpy.shutdown(context=context)
