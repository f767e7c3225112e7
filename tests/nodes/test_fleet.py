"""`vla-runtime fleet`: two robot namespaces served by one process, a policy node each, their observations
batched on one model. Real rclpy across processes; events counted, nothing timed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import PolicyNodeProcess, Robot  # noqa: I001  (sets ROS env first)

QUIET_TIMER = ("rate_hz:=1.0", "deadline_s:=10.0", "control_period_s:=1.0")


def test_two_robots_one_process_one_model(tmp_path):
    robots = {ns: Robot(namespace=ns, image_side=32) for ns in ("/fleet_a", "/fleet_b")}
    proc = PolicyNodeProcess(
        tmp_path,
        "preset:=pi05_tiny",
        "steps:=2",
        *QUIET_TIMER,
        command=["fleet", "--namespaces", ",".join(robots)],
    )
    try:
        assert proc.wait_for_log("serving:", 120), proc.text()
        for ns, robot in robots.items():
            got = robot.first_chunk()
            assert got is not None, (ns, proc.text()[-3000:])
            assert len(got[1].points) == 10  # pi05_tiny's chunk, published on this robot's own topic
        reports = {}
        for ns, robot in robots.items():
            # one server (one executor, one model) behind both nodes: each node's report counts 2 robots
            assert robot.wait_for(
                lambda r=robot: any(
                    int(d.get("server_completed", 0)) >= 1
                    and d.get("server_robots") == "2"
                    and d["server_completed"] == d.get("fresh")  # every chunk it published came from there
                    for d in list(r.diagnostics)
                ),
                30,
            ), (ns, list(robot.diagnostics)[-1:])
            reports[ns] = [d for d in robot.diagnostics if "server_completed" in d][-1]
        assert reports["/fleet_a"]["model_id"] == reports["/fleet_b"]["model_id"]
    finally:
        proc.stop()
        for robot in robots.values():
            robot.close()


def test_the_same_namespace_twice_is_refused():
    run = subprocess.run(
        [sys.executable, "-m", "vla_runtime", "fleet", "--namespaces", "/a,/a"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "distinct robot namespaces" in run.stderr and "Traceback" not in run.stderr


def test_robots_are_planned_onto_gpus():
    from vla_runtime.nodes.fleet import plan_fleet

    assert plan_fleet("/a,/b,/c", "0,1") == [("cuda:0", ["/a", "/c"]), ("cuda:1", ["/b"])]
    assert plan_fleet("/a,/b;/c", "0,1") == [("cuda:0", ["/a", "/b"]), ("cuda:1", ["/c"])]
    for robots, gpus, message in (
        ("/a;/b;/c", "0,1", "robots: 3 groups for 2 GPUs"),
        ("/a,/a", "0", "robots: distinct"),
        ("/a", "", "gpus: at least one"),
        ("/a", "zero", "gpus: GPU indices"),
        (",".join(f"/r{i}" for i in range(9)), "0", "at most 8 robots per GPU"),
        ("/a,/b", "0,0", "gpus: cuda:0 given more than once"),
        ("/a,/b", "0,00", "gpus: cuda:0 given more than once"),
        ("/a", "0,1", "robots: 1 robots for 2 GPUs: a GPU would serve none"),
    ):
        with pytest.raises(ValueError, match=message):
            plan_fleet(robots, gpus)


def test_fleet_launch_file_structure():
    """Checked without importing launch (not installable here): a fleet process per GPU of the plan,
    the YAML first, then only the given parameters."""
    from ament_index_python.packages import get_package_share_directory

    path = Path(get_package_share_directory("vla_runtime")) / "launch" / "fleet.launch.py"
    tree = ast.parse(path.read_text())
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {
        ("launch", "LaunchDescription"),
        ("launch.actions", "DeclareLaunchArgument"),
        ("launch.actions", "ExecuteProcess"),
        ("launch.actions", "OpaqueFunction"),
        ("vla_runtime.nodes.fleet", "plan_fleet"),
        ("vla_runtime.nodes.params", "command_line_overrides"),
    } <= imports
    declared = {
        c.args[0].value
        for c in ast.walk(tree)
        if isinstance(c, ast.Call)
        and getattr(c.func, "id", None) == "DeclareLaunchArgument"
        and isinstance(c.args[0], ast.Constant)
    }
    assert {"robots", "gpus", "params_file"} <= declared
    source = path.read_text()
    assert '"vla-runtime", "fleet", "--namespaces"' in source and '"--params-file", params_file' in source


def test_a_fleets_robots_ask_for_their_steps_and_after_close_nothing_is_served():
    """With adaptive steps each robot's node asks for its steps; the server runs a batch at its members'
    fewest (tests/runtime/test_server.py), and a robot alone gets what it asked for."""
    import numpy as np
    from vla_runtime.nodes.fleet import SharedServer
    from vla_runtime.runtime.config import RuntimeConfig

    from ..conftest import random_observation

    shared = SharedServer(robots=2)
    config = RuntimeConfig(preset="pi05_tiny", adaptive_steps=True)
    session = shared.session("/a", config)
    obs = random_observation(np.random.default_rng(), "pi05_tiny")
    assert session.submit(obs, steps=5).result(timeout=120).steps == 5
    assert session.submit(obs).result(timeout=120).steps == config.denoising_steps
    shared.close()
    with pytest.raises(ValueError, match="fleet: shutting down"):
        shared.session("/b", config)
    unused = SharedServer(robots=2)
    unused.close()
    with pytest.raises(ValueError, match="fleet: shutting down"):
        unused.session("/a", config)
    assert unused.executor is None  # nothing was built


class FakeExecutor:
    """Stands for the executor where only its building and closing matter."""

    def __init__(self, config, started=None, release=None):
        if started is not None:
            started.set()
            release.wait(30)
        self.config, self.closed, self.metadata = config, False, {}

    def close(self):
        self.closed = True


@pytest.fixture
def quiet_server(monkeypatch):
    """PolicyServer replaced by a stand-in: these tests are about who builds and who is refused."""
    from vla_runtime.nodes import fleet

    class Server:
        def __init__(self, executor):
            self.executor = executor

        def close(self):
            pass

    monkeypatch.setattr(fleet, "PolicyServer", Server)
    return fleet


def test_robots_may_differ_in_live_settings_but_not_in_model_settings(quiet_server):
    from vla_runtime.runtime.config import RuntimeConfig

    shared = quiet_server.SharedServer(robots=2, executor_factory=FakeExecutor)
    config = RuntimeConfig(preset="pi05_tiny", steps=2)
    shared.session("/a", config)
    shared.session("/b", config.replace(steps=3))  # a node's live setting: its own, per observation
    with pytest.raises(ValueError, match="seed: the robots of one server share its model settings"):
        shared.session("/c", config.replace(seed=1))


def test_closing_a_fleet_does_not_wait_for_a_load_and_the_late_executor_is_closed(quiet_server):
    """Ctrl-C while the first node builds the executor: close() returns at once (it waited for the whole
    load before), the builder closes what it built and its node gets no session."""
    import threading

    from vla_runtime.runtime.config import RuntimeConfig

    started, release = threading.Event(), threading.Event()
    built = []

    def factory(config):
        built.append(FakeExecutor(config, started, release))
        return built[-1]

    shared = quiet_server.SharedServer(robots=2, executor_factory=factory)
    outcome = []

    def load():
        try:
            outcome.append(shared.session("/a", RuntimeConfig(preset="pi05_tiny")))
        except ValueError as err:
            outcome.append(err)

    loader = threading.Thread(target=load)
    loader.start()
    assert started.wait(30)
    shared.close()  # while the load is in progress
    assert loader.is_alive() and not outcome  # close() did not wait for it
    release.set()
    loader.join(30)
    assert isinstance(outcome[0], ValueError) and "shutting down" in str(outcome[0])
    assert built[0].closed and shared.executor is None


def test_namespaces_are_written_as_ros_writes_them_and_checked():
    from vla_runtime.nodes.fleet import main, plan_fleet, robot_namespaces

    assert robot_namespaces(["arm_1/", " /arm_2", "/a/b"], "--namespaces") == ["/arm_1", "/arm_2", "/a/b"]
    with pytest.raises(ValueError, match="--namespaces: distinct robot namespaces needed"):
        robot_namespaces(["/a", "a"], "--namespaces")
    with pytest.raises(ValueError, match="--namespaces: '/arm-1' is not a ROS 2 namespace"):
        robot_namespaces(["/arm-1"], "--namespaces")
    with pytest.raises(ValueError, match="robots: distinct"):
        plan_fleet("/a,a", "0")
    assert plan_fleet("a,b", "0") == [("cuda:0", ["/a", "/b"])]
    # refused before ROS starts: exit 2
    assert main(["/a", "/arm-1"], []) == 2
    assert main(["/a", "/b"], ["-r", "__ns:=/x"]) == 2


def test_a_fleets_observation_has_what_is_left_of_its_deadline():
    """The server orders the robots by deadline: an observation that arrives 40 ms after it was taken,
    with a 50 ms deadline, has 10 ms left, as the node counts its miss."""
    from types import SimpleNamespace

    from vla_runtime.nodes.fleet import LEAST_BUDGET_S, deadline_budget

    node = SimpleNamespace(param=lambda name: {"deadline_s": 0.05}[name], now=lambda: 100.0)
    assert deadline_budget(node, SimpleNamespace(timestamp=99.96)) == pytest.approx(0.01)
    assert deadline_budget(node, SimpleNamespace(timestamp=99.9)) == LEAST_BUDGET_S  # already late
    assert deadline_budget(node, SimpleNamespace(timestamp=100.02)) == pytest.approx(0.05)  # clock skew


def test_fleet_parameters_reach_rcl_with_their_types():
    """fleet.launch.py passes the given parameters as -p name:=JSON, which rcl reads as YAML."""
    import yaml
    from vla_runtime.nodes.params import command_line_overrides, launch_overrides
    from vla_runtime.nodes.policy_node import tagged_path

    given = {"resize_on_device": "yes", "robot": "2024", "deadline_s": "5e-2", "steps": "3"}
    args = dict(arg.split(":=", 1) for arg in command_line_overrides(given))
    typed = {name: yaml.safe_load(text) for name, text in args.items()}
    assert typed == {"resize_on_device": "yes", "robot": "2024", "deadline_s": 0.05, "steps": 3}
    with pytest.raises(ValueError, match=r"optional_cameras:=\[\]: ROS 2 cannot type an empty list"):
        launch_overrides({"optional_cameras": "[]"})
    assert launch_overrides({"optional_cameras": "['']"}) == {"optional_cameras": [""]}
    assert tagged_path("/data/robot.mcap", "/arm_1") == "/data/robot.arm_1.mcap"
    assert tagged_path("/data/robot.mcap", "/a/b") == "/data/robot.a.b.mcap"
    assert tagged_path("/data/robot.mcap", "/a_b") == "/data/robot.a_b.mcap"
    assert tagged_path("/data/robot.mcap", "") == "/data/robot.mcap"


def test_a_node_that_waited_for_the_build_gets_the_built_executor_not_a_second(quiet_server):
    """The builder clears its flag and stores the executor in one step: a node woken in between built a
    second executor (two models on the GPU, the first never closed), unchecked against the first's
    settings. The window is opened here by a pause after each of the builder's releases of the lock."""
    import threading
    import time

    from vla_runtime.runtime.config import RuntimeConfig

    started, release = threading.Event(), threading.Event()
    built = []

    def factory(config):
        built.append(FakeExecutor(config, None if built else started, release))
        return built[-1]

    shared = quiet_server.SharedServer(robots=2, executor_factory=factory)
    config = RuntimeConfig(preset="pi05_tiny")
    sessions = []
    first = threading.Thread(target=lambda: sessions.append(shared.session("/a", config)))

    class PausedRelease(type(shared._cond)):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            if threading.current_thread() is first and release.is_set():
                time.sleep(0.3)  # the builder between two holds of the lock

    shared._cond = PausedRelease()
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: sessions.append(shared.session("/b", config)))
    second.start()  # waits for the build
    release.set()
    first.join(30)
    second.join(30)
    assert len(built) == 1 and len(sessions) == 2
    assert sessions[0].server is sessions[1].server
