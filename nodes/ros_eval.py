"""Closed-loop LIBERO through ROS: the policy node in its own process, the sim bridge here, the sim server
in LIBERO's environment; all on a ROS domain of their own, discovery on this machine only."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path


def isolate_ros_domain() -> None:
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)


class PolicyNodeProcess:
    def __init__(self, log_path: Path, ros_params: dict):
        args = [sys.executable, "-m", "vla_runtime", "node", "--ros-args"]
        for (
            k,
            v,
        ) in ros_params.items():  # in JSON, which rcl reads as YAML: a string stays one ("yes", "2024")
            args += ["-p", f"{k}:={json.dumps(v)}"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def node_params(config, record: str | None = None) -> dict:
    """The policy node's parameters for a RuntimeConfig: every setting (runtime/settings.py) that differs
    from the node's default, so nothing given on the command line is lost on the way to the node (and no
    empty value is passed: rcl cannot parse `-p name:=`)."""
    from ..runtime.settings import BY_NAME as SETTINGS
    from ..runtime.settings import setting_values
    from .params import BY_NAME

    params = {
        k: float(v) if SETTINGS[k].kind is float else v  # 5 would reach ROS as an integer
        for k, v in setting_values(config).items()
        if v != BY_NAME[k].default
    }
    if record:
        params["record_observations"] = str(Path(record).resolve())
    return params


STARTUP_TIMEOUT_S = 600.0  # loading, compiling and capturing pi05 on a GPU takes about a minute
SHUTDOWN_TIMEOUT_S = 10.0  # for the bridge's callbacks in progress when the evaluation ends


class RosPolicy:
    """`with RosPolicy(params, lockstep, log) as link:` the policy node process and the sim bridge link,
    spun on a thread of their own; both stopped on exit."""

    def __init__(self, params: dict, lockstep: bool, log_path: Path):
        from .sim_bridge_node import STATE_NAMES

        isolate_ros_domain()
        state_dim = int(params.get("state_dim", 8))
        self.params = {
            **params,
            # lockstep: the node runs on the simulation clock the bridge publishes; the clock and the
            # observation travel on different topics, so the node may see the observation first
            "use_sim_time": lockstep,
            **({"max_future_s": 10.0} if lockstep else {}),
            "state_joint_names": list(STATE_NAMES[:state_dim]),
        }
        self.lockstep, self.log_path = lockstep, log_path

    def __enter__(self):
        import rclpy  # noqa: PLC0415 - ROS is needed only on this path
        from rclpy.executors import SingleThreadedExecutor  # noqa: PLC0415

        from .sim_bridge_node import SimBridgeLink  # noqa: PLC0415

        self.node_proc = PolicyNodeProcess(self.log_path, self.params)
        self.context = rclpy.Context()  # its own: the caller may use rclpy too
        try:
            rclpy.init(context=self.context)
        except BaseException:
            self.node_proc.stop()
            raise
        self.link = SimBridgeLink(self.lockstep, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.link.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()
        try:
            self.link.wait_until_serving(STARTUP_TIMEOUT_S, alive=lambda: self.node_proc.proc.poll() is None)
        except RuntimeError as err:
            self.__exit__()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"{err}; its log ({self.log_path}) ends:\n{tail}") from None
        except BaseException:  # Ctrl-C while waiting: leave no node process behind
            self.__exit__()
            raise
        return self.link

    def __exit__(self, *exc):
        import rclpy  # noqa: PLC0415

        try:
            # Bounded: a callback that never returns must not hold the evaluation (and its node) for ever.
            self.executor.shutdown(timeout_sec=SHUTDOWN_TIMEOUT_S)
            self.link.close()
            rclpy.shutdown(context=self.context)
        finally:
            self.node_proc.stop()  # whatever ROS's teardown did: no policy node left behind
