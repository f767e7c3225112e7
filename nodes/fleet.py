"""Several robots served by one process: a policy node per robot namespace, one batched server below them.

    vla-runtime fleet --namespaces /arm_1,/arm_2 --preset pi05 --device cuda

Why a node per namespace rather than one node with N namespaces: each robot then sees an ordinary policy
node (the same topics, parameters, lifecycle, diagnostics and launch arguments as a single robot's), so
nothing on the robot side changes between one robot and a fleet, and a robot can be taken out (its node
deactivated) without touching the others. The batching happens below the nodes: every node's policy is a
session of one `PolicyServer` (runtime/server.py) over one executor with one copy of the weights, which
batches the robots' observations earliest deadline first.

Robots on other hosts reach it over ROS 2 as they would a node of their own: DDS carries the topics.
The nodes spin on one thread (rclpy's multi-threaded executor contends for the GIL with the engine's own
threads; see policy_node.main).
"""

from __future__ import annotations

import sys
import threading

import rclpy
import rclpy.executors

from ..runtime.buffers import batch_profile
from ..runtime.config import RuntimeConfig
from ..runtime.executor import PipelinedExecutor
from ..runtime.handover import PreviousChunk
from ..runtime.server import PolicyServer
from ..runtime.settings import SETTINGS, setting_values
from .params import command_line_parameters
from .policy_node import EXIT_BAD_PARAMETERS, PolicyNode, StartupError, start_up_error


class SharedServer:
    """The executor and server of the process, built by the first node that configures; the others get
    sessions of it. Every node's model settings must be the same (one model serves them all)."""

    def __init__(self, robots: int, executor_factory=PipelinedExecutor):
        self.robots, self._executor_factory = robots, executor_factory
        self._cond = threading.Condition()
        self._closed = False
        self._building = False  # a node's loading thread is building the executor (outside the lock)
        self.config: RuntimeConfig | None = None
        self.executor: PipelinedExecutor | None = None
        self.server: PolicyServer | None = None

    def factory_for(self, robot: str, budget_s=None):
        """The node's policy factory; `budget_s(obs)` (from the node's deadline_s and clock) is what is
        left of an observation's deadline when it is submitted."""
        return lambda config: self.session(robot, config, budget_s)

    def session(self, robot: str, config: RuntimeConfig, budget_s=None) -> ServedPolicy:
        """The robot's session; the first node to ask builds the executor, the others wait for it. Model
        settings must be the same for every robot; those a node applies live (steps) may differ."""
        config = config.replace(max_batch=batch_profile(self.robots, config.batch_profiles))
        with self._cond:  # the nodes load on threads of their own
            self._cond.wait_for(lambda: self._closed or not self._building)
            if self._closed:
                raise ValueError("fleet: shutting down")
            build = self.executor is None
            if build:
                self._building = True
            else:
                self._check_shared(config)
        if build:
            try:  # outside the lock: close() (Ctrl-C) must not wait for a load of tens of seconds
                executor = self._executor_factory(config)
            except BaseException:
                with self._cond:
                    self._building = False
                    self._cond.notify_all()
                raise
            with self._cond:  # stored and announced at once: a waiting node must see it, not build again
                self._building = False
                self._cond.notify_all()
                if not self._closed:
                    self.executor, self.server, self.config = executor, PolicyServer(executor), config
            if self.executor is not executor:  # closed while it loaded
                executor.close()
                raise ValueError("fleet: shutting down")
        return ServedPolicy(self.server, robot, budget_s)

    def _check_shared(self, config: RuntimeConfig) -> None:
        ours, theirs = shared_settings(self.config), shared_settings(config)
        differ = sorted(k for k in ours if ours[k] != theirs[k])
        if differ:
            raise ValueError(f"{', '.join(differ)}: the robots of one server share its model settings")

    def close(self) -> None:
        """Once, without waiting for a load in progress; a node still loading then gets no session (an
        executor that finishes loading after this is closed by its builder)."""
        with self._cond:
            self._closed = True
            server, executor = self.server, self.executor
            self._cond.notify_all()
        if server is not None:
            server.close()
        if executor is not None:
            executor.close()


def shared_settings(config: RuntimeConfig) -> dict:
    """The settings every robot of a server must have alike: all but those a node applies live (each
    robot's own, per observation)."""
    return {name: value for name, value in setting_values(config).items() if not SETTINGS_BY_NAME[name].live}


SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


class ServedPolicy:
    """What a node needs of a policy (runtime/policy.py's interface), served by a session of the server."""

    def __init__(self, server: PolicyServer, robot: str, budget_s=None):
        self.server, self.robot, self._budget_s = server, robot, budget_s
        self.metadata = server.executor.metadata

    def submit(self, obs, noise=None, steps: int | None = None, previous: PreviousChunk | None = None):
        """`steps`: at most this many (the node's adaptive steps); a batch runs at its members' fewest. The
        server orders the robots by what is left of each observation's deadline, which runs from when it
        was taken, as the node counts misses (an observation that arrives old has less time)."""
        deadline = self._budget_s(obs) if self._budget_s is not None else None
        return self.server.submit(
            self.robot, obs, previous=previous, noise=noise, deadline_s=deadline, steps=steps
        )

    def health(self) -> dict:
        """The executor's health, and under "robot" this robot's counters and latency in the server, with
        the number of robots the server has served and the batches it held for company."""
        figures = self.server.figures()
        held = self.server.batching.counters["held"]
        return {
            **self.server.executor.health(),
            "robot": {**figures.get(self.robot, {}), "robots": len(figures), "batches_held": held},
        }

    def reset(self) -> None:
        """Nothing of a robot's stays in the server between episodes but its counters."""

    def close(self) -> None:
        """The shared executor outlives a node's release; the process closes it at exit."""


# The least a deadline is given: an observation that arrives past its deadline still goes to the server
# (first in its order), and the server's deadlines must be positive.
LEAST_BUDGET_S = 1e-3


def deadline_budget(node: PolicyNode, obs) -> float:
    """What is left of `obs`'s deadline on the node's clock (its deadline_s runs from the stamp)."""
    return max(LEAST_BUDGET_S, node.param("deadline_s") - max(0.0, node.now() - obs.timestamp))


def robot_namespaces(names: list[str], what: str) -> list[str]:
    """Namespaces as ROS 2 writes them ("arm_1/" -> "/arm_1"), each valid and each once; ValueError
    names `what` (the argument) otherwise."""
    from rclpy.validate_namespace import validate_namespace  # noqa: PLC0415 - rclpy: ROS machines only

    out = []
    for name in names:
        ns = "/" + name.strip().strip("/")
        try:
            validate_namespace(ns)
        except Exception as err:  # noqa: BLE001 - rclpy's InvalidNamespaceException, named
            raise ValueError(
                f"{what}: {name!r} is not a ROS 2 namespace ({str(err).splitlines()[0]})"
            ) from None
        out.append(ns)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{what}: distinct robot namespaces needed, got {names}")
    return out


def plan_fleet(robots: str, gpus: str) -> list[tuple[str, list[str]]]:
    """Scale-out: which robots each GPU's server serves. `robots`: namespaces separated by commas, or
    groups separated by semicolons, one group per GPU ("/a,/b;/c,/d"); without groups the robots are
    dealt to the GPUs in turn. `gpus`: device indices ("0,1"). -> [(device, namespaces)], one server each.
    ValueError names the argument."""
    indices = [g.strip() for g in gpus.split(",") if g.strip()]
    if not all(g.isdigit() for g in indices):
        raise ValueError(f"gpus: GPU indices separated by commas, got {gpus!r}")
    devices = [f"cuda:{int(g)}" for g in indices]
    if not devices:
        raise ValueError(f"gpus: at least one GPU index, got {gpus!r}")
    if len(set(devices)) < len(devices):  # two servers on one GPU would each hold the weights, unbatched
        repeated = sorted({d for d in devices if devices.count(d) > 1})
        raise ValueError(f"gpus: {', '.join(repeated)} given more than once ({gpus!r})")
    groups = [[ns.strip() for ns in group.split(",") if ns.strip()] for group in robots.split(";")]
    every = robot_namespaces([ns for group in groups for ns in group], "robots")
    groups = [robot_namespaces(group, "robots") if group else [] for group in groups]
    if len(groups) == 1:
        if len(every) < len(devices):
            raise ValueError(
                f"robots: {len(every)} robots for {len(devices)} GPUs: a GPU would serve none "
                f"({robots!r}, gpus {gpus!r})"
            )
        groups = [every[i :: len(devices)] for i in range(len(devices))]
    if len(groups) != len(devices) or not all(groups):
        raise ValueError(
            f"robots: {len(groups)} groups for {len(devices)} GPUs, each GPU one non-empty group "
            f"({robots!r}, gpus {gpus!r})"
        )
    if max(len(g) for g in groups) > 8:
        raise ValueError("robots: at most 8 robots per GPU's server")
    return list(zip(devices, groups, strict=True))


def main(namespaces: list[str], ros_args: list[str], executor_factory=PipelinedExecutor) -> int:
    """Exit 0 on Ctrl-C or when a node's shutdown transition ends it, 2 for bad parameters (also when a
    node's autostart refuses one), 1 when a node's autostart fails otherwise."""
    try:
        namespaces = robot_namespaces(namespaces, "--namespaces")
    except ValueError as err:
        print(f"fleet: {err}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    # A node-wide remap would move every robot's node to one name (rcl applies it to each node)
    remapped = [arg for arg in ros_args if any(f"{key}:=" in arg for key in ("__ns", "__node", "__name"))]
    if remapped:
        print(
            f"fleet: {remapped[0]}: each robot's node has its own namespace (--namespaces)", file=sys.stderr
        )
        return EXIT_BAD_PARAMETERS
    if len(namespaces) > 8:
        print(f"fleet: --namespaces: at most 8 robots per server, got {len(namespaces)}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    try:
        command_line_parameters(ros_args, warn=lambda w: print(f"fleet: {w}", file=sys.stderr))
        rclpy.init(args=["vla-runtime-fleet", *ros_args])
    except Exception as err:  # noqa: BLE001 - ours, and rcl's own errors (a missing params file), as one line
        print(f"fleet: {start_up_error(err)}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    shared = SharedServer(len(namespaces), executor_factory)
    nodes: list[PolicyNode] = []
    try:
        for ns in namespaces:
            made: list[PolicyNode] = []  # the node's own deadline_s and clock date its robot's observations
            budget = lambda obs, made=made: deadline_budget(made[0], obs)  # noqa: E731
            made.append(
                PolicyNode(namespace=ns, policy_factory=shared.factory_for(ns, budget), record_tag=ns)
            )
            nodes.append(made[0])
        executor = rclpy.executors.SingleThreadedExecutor()
        for node in nodes:
            if node.param("autostart"):
                node.autostart()
            executor.add_node(node)
        while rclpy.ok() and not any(node.finished.done() for node in nodes):
            executor.spin_once(timeout_sec=0.1)
        finished = [node.finished.result() for node in nodes if node.finished.done()]
        return max(finished, default=0)
    except StartupError as err:
        print(f"fleet: bad parameters: {err}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        return 0
    finally:
        for node in nodes:
            try:
                node._release(wait_for_loading=False)
                node.destroy_node()
            except Exception as err:  # noqa: BLE001 - the other nodes and the server are released all the same
                print(f"fleet: releasing {node.get_namespace()}: {err}", file=sys.stderr)
        shared.close()
        if rclpy.ok():
            rclpy.shutdown()
