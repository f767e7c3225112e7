"""The policy node's parameters: one table of name, default, description and check.

Each is declared with its type, range (where it has one) and description, so `ros2 param describe`
tells users what it does; every set, at start-up or at run time, goes through `check`, and a bad value
is refused with the reason while the node keeps running.
"""

from __future__ import annotations

import difflib
import json
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from ..graphs.config import PI0_CAMERAS
from ..runtime.config import RuntimeConfig
from ..runtime.settings import SETTINGS, STATE_IN_PROMPT, Setting, config_values

__all__ = ["PARAMS", "BY_NAME", "STATE_IN_PROMPT", "launch_overrides", "runtime_config_from_params"]

# LIBERO's Franka: 7 actions (6 end-effector deltas + gripper); names are what the trajectory carries.
DEFAULT_JOINTS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    check: Callable[[Any], str | None] = lambda v: None  # returns the reason a value is refused
    range: tuple[float, float] | None = None
    needs_reconfigure: bool = False  # read at configure: a change takes effect after cleanup + configure
    builtin: bool = False  # declared by rclpy itself (use_sim_time): in the YAML and launch, not declared


def _one_of(*options):
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}"


def _in_range(lo, hi):
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


def _names(v):
    if not v or any(not n or "/" in n or " " in n for n in v):
        return "must be a non-empty list of names without '/' or spaces"
    return None if len(set(v)) == len(v) else "has duplicate names"


def _names_or_empty(v):
    return None if not v else _names(v)


def _from_setting(setting: Setting) -> Param:
    """A model setting (runtime/settings.py) as a node parameter: the same default, help and check."""
    rng = None
    if setting.range is not None:  # the declared range must admit the "not set" value (0)
        low = (
            min(setting.range[0], setting.unset)
            if isinstance(setting.unset, (int, float))
            else setting.range[0]
        )
        rng = (low, setting.range[1])
    help_text = setting.help + "."
    if setting.unset is not None:  # "none" is how the command line says it; ROS says "" or 0
        help_text = help_text.replace("none = ", f"{json.dumps(setting.unset)} = ")
    return Param(
        setting.name, setting.default, help_text, setting.check, rng, needs_reconfigure=not setting.live
    )


PARAMS = tuple(_from_setting(s) for s in SETTINGS) + (
    Param(
        "record_observations",
        "",
        "Record every observation served to this MCAP file (for vla-runtime calibrate); an existing file "
        "is refused, never overwritten; in a fleet each robot's file has its namespace before the suffix "
        "(robot.arm_1.mcap); empty = off.",
        needs_reconfigure=True,
    ),
    Param(
        "rate_hz",
        20.0,
        "Rate of the deadline watch: a timer that publishes the current chunk's tail when an observation's "
        "deadline passed with no fresh chunk. Fresh chunks are published the moment they are ready.",
        _in_range(1.0, 200.0),
        (1.0, 200.0),
    ),
    Param(
        "deadline_s",
        0.05,
        "An observation's deadline: a fresh chunk must be published within this time after it was taken.",
        _in_range(0.001, 10.0),
        (0.001, 10.0),
    ),
    Param(
        "control_period_s",
        0.05,
        "Time between consecutive actions of a chunk (time_from_start step).",
        _in_range(0.001, 1.0),
        (0.001, 1.0),
    ),
    Param(
        "max_obs_age_s",
        0.5,
        "Observations older than this are not served (stale); an optional camera silent this long is "
        "left out (masked).",
        _in_range(0.01, 60.0),
        (0.01, 60.0),
    ),
    Param(
        "sync_tolerance_s",
        0.025,
        "Cameras and state are one observation when their stamps lie within this of each other.",
        _in_range(0.0, 1.0),
        (0.0, 1.0),
    ),
    Param(
        "max_future_s",
        0.1,
        "Inputs stamped further ahead of this node's clock are refused (clocks not synchronised).",
        _in_range(0.0, 10.0),
        (0.0, 10.0),
    ),
    Param(
        "use_sim_time",
        False,
        "Run on the /clock topic (a simulator's time) instead of the system clock.",
        builtin=True,
    ),
    Param(
        "cameras",
        list(PI0_CAMERAS),
        "Model camera names; subscribes to camera/<name>/image_raw.",
        _names,
        needs_reconfigure=True,
    ),
    Param(
        "optional_cameras",
        ["right_wrist_0_rgb"],
        "Cameras that may be absent (masked out).",
        needs_reconfigure=True,
    ),
    Param(
        "joint_names",
        list(DEFAULT_JOINTS),
        "Joint names of the published trajectory, one per action dim.",
        _names,
        needs_reconfigure=True,
    ),
    Param(
        "state_joint_names",
        [],
        "JointState: the joints of the state vector, in order, found by name; empty = position as it comes.",
        _names_or_empty,
        needs_reconfigure=True,
    ),
    Param(
        "state_msg_type",
        "joint_state",
        "joint_state (sensor_msgs/JointState.position) or float32_multi_array (std_msgs/Float32MultiArray).",
        _one_of("joint_state", "float32_multi_array"),
        needs_reconfigure=True,
    ),
    Param(
        "action_queue_depth",
        2,
        "Depth of the action_chunk publisher queue.",
        _in_range(1, 100),
        (1, 100),
        needs_reconfigure=True,
    ),
    Param(
        "action_reliable", True, "Reliable (true) or best-effort action_chunk QoS.", needs_reconfigure=True
    ),
    Param("diagnostics_rate_hz", 1.0, "Rate of /diagnostics.", _in_range(0.1, 50.0), (0.1, 50.0)),
    Param(
        "autostart",
        True,
        "Configure and activate at start-up (otherwise wait for lifecycle transitions).",
        needs_reconfigure=True,
    ),
)
BY_NAME = {p.name: p for p in PARAMS}


def launch_overrides(given: dict[str, str]) -> dict[str, Any]:
    """Launch arguments (strings; "" = not given) -> typed parameter overrides, each checked. A bad value
    stops the launch with the parameter's name and reason instead of starting a node that refuses it."""
    overrides = {}
    for name, text in given.items():
        if text == "":
            continue
        param = BY_NAME[name]
        value = read_yaml(param, text) if not isinstance(param.default, str) else text
        if isinstance(param.default, float) and not isinstance(value, bool):
            try:  # passed on in JSON as a float: `5e-2` (YAML 1.1 reads it as text) and `1` (an int)
                value = float(text)
            except ValueError:
                pass
        overrides[name] = typed_value(param, text, value)
    return overrides


def read_yaml(param: Param, text: str) -> Any:
    """A value as rcl reads it (YAML); ValueError naming the parameter when it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"{param.name}:={text}: not a YAML value ({problem})") from None


def typed_value(param: Param, text: str, value: Any) -> Any:
    """`value` (read from `text`) as the parameter's type, checked; ValueError naming the parameter."""
    if value == [] and isinstance(param.default, list):
        raise ValueError(f"{param.name}:=[]: ROS 2 cannot type an empty list; give [''] for none")
    expected = type(param.default)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        hints = {str: " (quote it: a string that reads as another type)", float: " (write it with a point)"}
        raise ValueError(f"{param.name}:={text}: expected {expected.__name__}{hints.get(expected, '')}")
    reason = param.check(value)
    if reason:
        raise ValueError(f"{param.name}:={text}: {reason}")
    return value


# Parameters that rcl and rclpy declare on every node (or families of them), which a `-p` may set too.
ROS_OWN_PARAMETERS = ("qos_overrides.", "start_type_description_service")
# rcl's words for a boolean (rcl_yaml_param_parser); any other unquoted scalar is an integer (strtol, base
# 0), else a double (strtod), else a string: not YAML 1.1's rules (2024-06-01, ~, null, 1_000 are text).
RCL_TRUE = {"Y", "y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
RCL_FALSE = {"N", "n", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"}


def rcl_scalar(text: str) -> Any:
    if text in RCL_TRUE or text in RCL_FALSE:
        return text in RCL_TRUE
    if "_" not in text:  # Python's numbers take underscores, C's do not
        for parse in (lambda t: int(t, 0), float):
            try:
                return parse(text)
            except ValueError:
                pass
    return text


def rcl_value(param: Param, text: str) -> Any:
    """A `-p` value as rcl types it: a quoted scalar is a string, a plain one by `rcl_scalar`, a flow
    sequence of scalars a list. ValueError naming the parameter where rcl could not read it."""
    try:
        node = yaml.compose(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"{param.name}:={text}: not a YAML value ({problem})") from None

    def value(n):
        if isinstance(n, yaml.SequenceNode):
            return [value(item) for item in n.value]
        if isinstance(n, yaml.ScalarNode):
            return n.value if n.style in ("'", '"') else rcl_scalar(n.value)
        raise ValueError(f"{param.name}:={text}: a mapping is no parameter value")

    if node is None:
        raise ValueError(f"{param.name}:=: no value (rcl cannot read `name:=`)")
    return value(node)


def command_line_parameters(ros_args: list[str], warn=print) -> dict[str, Any]:
    """The `-p [node:]name:=value` sets among ROS arguments, typed as rcl types them and checked as the
    node checks a set, before rcl reads them: rcl would resolve, without a word, a set whose type differs
    from the parameters file's to the file's value. A name the node does not declare is only warned about
    (`warn`): rcl ignores it, and launch's SetParameter gives every node of a launch the same sets."""
    found, problems = {}, []
    for flag, item in zip(ros_args, ros_args[1:], strict=False):
        name, given, text = item.partition(":=")
        if flag not in ("-p", "--param") or not given:
            continue  # not a parameter set, or one rcl refuses itself
        name = name.rsplit(":", 1)[-1]  # `node_name:parameter` sets one node's
        if name.startswith(ROS_OWN_PARAMETERS):
            continue
        param = BY_NAME.get(name)
        if param is None:
            close = difflib.get_close_matches(name, BY_NAME, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warn(f"{item}: the policy node has no parameter {name!r}{hint}; ignored")
            continue
        try:
            found[name] = typed_value(param, text, rcl_value(param, text))
        except ValueError as err:
            problems.append(str(err))
    if problems:  # every bad one named at once
        raise ValueError("bad parameters: " + "; ".join(problems))
    return found


def command_line_overrides(given: dict[str, str]) -> list[str]:
    """`launch_overrides` as `-p` arguments (`name:=value`), each value in JSON, which rcl reads as YAML:
    a string stays a string ("yes", "2024"), numbers and lists keep their types."""
    return [f"{name}:={json.dumps(value)}" for name, value in launch_overrides(given).items()]


def runtime_config_from_params(get) -> RuntimeConfig:
    """The RuntimeConfig a node's parameters describe (`get(name)` reads one)."""
    joints = tuple(get("joint_names"))
    cameras = list(get("cameras"))
    return RuntimeConfig(
        **config_values(get),
        robot_action_dim=len(joints),
        action_names=joints,
        optional_cameras=tuple(c for c in get("optional_cameras") if c in cameras),
    )


YAML_HEADER = """\
# Parameters of the vla_runtime policy node, generated from their one declaration
# (`python -m vla_runtime.nodes.params > launch/config/policy.yaml`; a test keeps the two equal).
# Loaded by launch/policy.launch.py and by `vla-runtime node`; `/**` matches any node name and namespace.
# Each value is the default; `ros2 param describe` explains each parameter too.
/**:
  ros__parameters:
"""


def policy_yaml() -> str:
    """policy.yaml: every parameter with its default, its description as the comment above it."""
    lines = [YAML_HEADER.rstrip("\n")]
    for p in PARAMS:
        lines += textwrap.wrap(p.description, 100, initial_indent="    # ", subsequent_indent="    # ")
        lines.append(f"    {p.name}: {json.dumps(p.default)}")  # JSON is YAML: quoted strings, [..]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(policy_yaml(), end="")
