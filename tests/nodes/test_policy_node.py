"""The policy node with real rclpy across processes (the node in its own process, a fake robot here):
rate, content, deadline misses, stale inputs, bad inputs, parameters, and the ament index."""

from __future__ import annotations

import ast
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from .harness import PolicyNodeProcess, Robot, header_seconds, point_seconds  # noqa: I001  (sets ROS env first)

JOINTS = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


@pytest.fixture(scope="module")
def robot():
    r = Robot()
    yield r
    r.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory, robot):
    proc = PolicyNodeProcess(tmp_path_factory.mktemp("node"), "preset:=pi05_tiny", "steps:=5")
    assert proc.wait_for_log("serving at 20.0 Hz", 120), proc.text()
    robot.publishing.set()
    assert robot.wait_for(lambda: len(robot.chunks) > 5, 30), proc.text()
    yield proc
    proc.stop()


def latest_diag(robot, key=None):
    diags = [d for d in robot.diagnostics if key is None or key in d]
    return diags[-1] if diags else None


def test_chunks_at_20hz_with_shape_names_and_stamps(node, robot):
    time.sleep(1.0)
    t0 = robot.now()
    time.sleep(5.0)
    window = robot.chunks_between(t0, t0 + 5.0)
    rate = len(window) / 5.0
    assert 18.0 <= rate <= 22.0, f"{rate:.1f} Hz"
    for msg in window:
        assert list(msg.joint_names) == JOINTS
        assert 1 <= len(msg.points) <= 10  # pi05_tiny: horizon 10
        times = [point_seconds(p) for p in msg.points]
        assert all(len(p.positions) == 7 and np.isfinite(p.positions).all() for p in msg.points)
        assert np.allclose(np.diff(times), 0.05, atol=1e-6)  # one point per control period
        assert all(abs(t / 0.05 - round(t / 0.05)) < 1e-6 for t in times)
    received = [(t, m) for t, m in robot.chunks if t0 <= t < t0 + 5.0]
    for t, msg in received:
        stamp = header_seconds(msg)
        assert 0.0 <= t - stamp <= 0.5 + 0.2  # the observation's time, within max_obs_age
        assert stamp + point_seconds(msg.points[-1]) >= t - 0.06  # nothing entirely in the past
    diag = latest_diag(robot, "chunk_rate_hz")
    assert diag is not None and float(diag["chunk_rate_hz"]) > 5
    assert {
        "vision_p50_ms",
        "prefix_p99_ms",
        "denoise_p50_ms",
        "deadline_misses",
        "dropped_frames",
        "stale_inputs",
    } <= set(diag)


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
        "image",
        "camera/base_0_rgb/image_raw: height/width",
        lambda s: Image(header=_h(s), height=0, width=4, encoding="rgb8", step=12, data=b""),
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
]


def _h(stamp):
    from std_msgs.msg import Header

    return Header(stamp=stamp)


@pytest.mark.parametrize("kind, expected, make", BAD_INPUTS, ids=[b[1].split(": ", 1)[1] for b in BAD_INPUTS])
def test_bad_input_is_logged_dropped_and_node_keeps_publishing(node, robot, kind, expected, make):
    robot.sabotage = {"kind": kind, "make": make}
    try:
        assert node.wait_for_log(expected, 10), node.text()[-2000:]
        t0 = robot.now()
        time.sleep(1.0)
        assert len(robot.chunks_between(t0, t0 + 1.0)) >= 15
    finally:
        robot.sabotage = None
    assert int(latest_diag(robot, "bad_inputs")["bad_inputs"]) >= 1 or robot.wait_for(
        lambda: int(latest_diag(robot, "bad_inputs")["bad_inputs"]) >= 1, 3
    )


def _set_parameter(robot, name, value: float):
    client = robot.node.create_client(SetParameters, "/policy_node/set_parameters")
    assert client.wait_for_service(10)
    request = SetParameters.Request(
        parameters=[
            Parameter(
                name=name, value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
            )
        ]
    )
    future = client.call_async(request)
    end = time.monotonic() + 10
    while not future.done() and time.monotonic() < end:
        time.sleep(0.05)
    robot.node.destroy_client(client)
    return future.result().results[0]


def test_parameters_are_validated_on_set(node, robot):
    refused = _set_parameter(robot, "rate_hz", 1000.0)
    assert not refused.successful and "rate_hz" in refused.reason
    accepted = _set_parameter(robot, "max_obs_age_s", 0.4)
    assert accepted.successful
    t0 = robot.now()
    time.sleep(1.0)
    assert len(robot.chunks_between(t0, t0 + 1.0)) >= 15  # still serving


def test_stopped_inputs_are_reported_and_nothing_stale_is_published(node, robot):
    robot.publishing.clear()
    stopped = robot.now()
    assert robot.wait_for(
        lambda: (latest_diag(robot, "stale_inputs") or {}).get("message") == "stale inputs", 6
    )
    assert int(latest_diag(robot, "stale_inputs")["stale_inputs"]) > 0
    time.sleep(1.0)
    after = [(t, m) for t, m in robot.chunks if t > stopped]
    for t, msg in after:  # only the tail of the last chunk, never an action whose time has passed
        assert header_seconds(msg) + point_seconds(msg.points[0]) >= t - 0.06
    assert all(t < stopped + 0.5 + 0.3 for t, _ in after)  # the last chunk spans 0.5 s, then silence
    assert node.wait_for_log("stale inputs", 5)
    robot.publishing.set()
    assert robot.wait_for(lambda: len([t for t, _ in robot.chunks if t > robot.now() - 0.5]) >= 5, 10)


def test_slow_policy_counts_misses_and_publishes_the_tail(tmp_path):
    # A namespace of its own: relative topics follow it, and the module's node is not heard.
    r = Robot(namespace="/slow")
    proc = PolicyNodeProcess(
        tmp_path, "preset:=pi05_tiny", "steps:=2", "inject_latency_s:=0.08", namespace="/slow"
    )
    try:
        assert proc.wait_for_log("serving at", 120), proc.text()
        r.publishing.set()
        assert r.wait_for(
            lambda: (
                int((latest_diag(r, "deadline_misses") or {"deadline_misses": 0})["deadline_misses"]) > 10
            ),
            20,
        ), proc.text()[-2000:]
        t0 = r.now()
        time.sleep(2.0)
        window = r.chunks_between(t0, t0 + 2.0)
        assert len(window) >= 30  # the timer keeps its rate on tails
        assert any(point_seconds(m.points[0]) >= 0.1 for m in window)  # tails: passed actions were cut
    finally:
        proc.stop()
        r.close()


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
    try:
        assert refused.wait_for_log("has no normalisation statistics", 60), refused.text()
    finally:
        refused.stop()
    r = Robot(namespace="/horizon")
    # Actions 0.5 s apart: the first is past when the chunk lands, the other n_action_steps - 1 = 3 are not
    # (with the horizon's 6 it would be 5).
    proc = PolicyNodeProcess(
        tmp_path,
        f"checkpoint:={ckpt}",
        "allow_unnormalized:=true",
        "control_period_s:=0.5",
        namespace="/horizon",
    )
    try:
        assert proc.wait_for_log("serving at", 120), proc.text()
        r.publishing.set()
        assert r.wait_for(lambda: len(r.chunks) > 10, 30), proc.text()[-2000:]
        counts = {len(m.points) for _, m in r.chunks}
        assert max(counts) == 3 and min(counts) >= 1, counts
    finally:
        proc.stop()
        r.close()


def test_unknown_camera_is_refused_at_configure(tmp_path):
    proc = PolicyNodeProcess(
        tmp_path,
        "preset:=pi05_tiny",
        "cameras:=['base_0_rgb','left_wrist_0_rgb','top_cam']",
        namespace="/unknown_camera",
    )
    try:
        assert proc.wait_for_log("cameras: ['top_cam'] are not cameras of pi05_tiny", 60), proc.text()
        assert proc.wait_for_log("waiting for lifecycle transitions", 10)
    finally:
        proc.stop()


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
