"""The shipped parameter file names only declared parameters, each with a value of its declared type and
one that the parameter's own check accepts (so `ros2 launch` with the defaults configures)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from vla_runtime.nodes.params import PARAMS, launch_overrides

POLICY_YAML = Path(__file__).resolve().parents[2] / "launch" / "config" / "policy.yaml"


def test_policy_yaml_matches_the_declared_parameters():
    values = yaml.safe_load(POLICY_YAML.read_text())["/**"]["ros__parameters"]
    declared = {p.name: p for p in PARAMS}
    assert set(values) <= set(declared), sorted(set(values) - set(declared))
    for name, value in values.items():
        param = declared[name]
        expected = float if isinstance(param.default, float) else type(param.default)
        assert isinstance(value, expected), (name, value, param.default)
        assert param.check(value) is None, (name, value, param.check(value))
    # the precision options users look for are in the file, not only in the code
    assert {"precision", "vision_precision", "fp8_expert"} <= set(values)


def test_launch_arguments_override_the_file_only_when_given():
    """`ros2 launch ... checkpoint:=/x fp8_calibration:=/s` overrides those two; the rest keep the YAML."""
    given = {p.name: "" for p in PARAMS}
    given.update(
        checkpoint="/ckpt/pi05_libero",
        fp8_expert="true",
        rate_hz="30",
        steps="5",
        state_in_prompt="without_state",
    )
    assert launch_overrides(given) == {
        "checkpoint": "/ckpt/pi05_libero",
        "fp8_expert": True,
        "rate_hz": 30.0,
        "steps": 5,
        "state_in_prompt": "without_state",
    }
    assert launch_overrides({p.name: "" for p in PARAMS}) == {}
    for name, text, reason in (
        ("steps", "50", "steps:=50: must be in [1, 10]"),
        ("precision", "fp4", "precision:=fp4: must be one of"),
        ("fp8_expert", "maybe", "fp8_expert:=maybe: expected bool"),
        ("state_in_prompt", "false", "state_in_prompt:=false: must be one of"),
    ):
        with pytest.raises(ValueError, match=re.escape(reason)):
            launch_overrides({name: text})


def test_policy_yaml_is_generated_from_the_declaration():
    from vla_runtime.nodes.params import policy_yaml

    assert POLICY_YAML.read_text() == policy_yaml(), (
        "launch/config/policy.yaml is stale: python -m vla_runtime.nodes.params > launch/config/policy.yaml"
    )


def test_command_line_parameter_sets_are_typed_and_checked_before_rcl_reads_them():
    """`--ros-args -p name:=value` typed as rcl types it (its boolean words, then integer, double, else
    text; quoted: text): a set whose type differs from the file's would be resolved by rcl to the file's
    value without a word; here it is refused, named, and the node's own checks apply. Sets rcl declares
    itself pass; a node-prefixed set counts; a name the node lacks is warned about (launch's SetParameter
    gives every node the same sets), not refused."""
    from vla_runtime.nodes.params import command_line_parameters

    warned = []
    sets = ["-p", "deadline_s:=5e-2", "-p", "policy_node:steps:=3", "--param", 'checkpoint:="2024"']
    sets += ["-p", "compile_cache:=2024-06-01", "-p", "autostart:=y", "-p", "stepz:=3", "-p", "seed:=0x10"]
    assert command_line_parameters(["--ros-args", *sets], warn=warned.append) == {
        "deadline_s": 0.05,
        "steps": 3,
        "checkpoint": "2024",
        "compile_cache": "2024-06-01",  # YAML 1.1 would read a date; rcl reads text
        "autostart": True,
        "seed": 16,
    }
    assert warned == ["stepz:=3: the policy node has no parameter 'stepz' (did you mean steps?); ignored"]
    assert command_line_parameters(["--ros-args", "-p", "qos_overrides./x.publisher.depth:=3"]) == {}
    assert command_line_parameters(["--ros-args", "-r", "a:=b", "--params-file", "x.yaml"]) == {}
    assert command_line_parameters(["--ros-args", "-p", "optional_cameras:=['']"]) == {
        "optional_cameras": [""]
    }
    for item, message in (
        ("steps:=abc", "steps:=abc: expected int"),
        ("steps:=3.5", "steps:=3.5: expected int"),
        ("seed:=1_000", "seed:=1_000: expected int"),  # rcl reads text (C's strtol takes no underscores)
        ("rate_hz:=20", "rate_hz:=20: expected float (write it with a point)"),  # rcl: an integer
        ("checkpoint:=2024", "checkpoint:=2024: expected str (quote it"),
        ("resize_on_device:=yes", "resize_on_device:=yes: expected str"),  # rcl: a boolean
        ("autostart:=0", "autostart:=0: expected bool"),
        ("handover:=bogus", "handover:=bogus: must be one of"),
        ("joint_names:=[]", "joint_names:=[]: ROS 2 cannot type an empty list"),
        ("joint_names:=[a, b", "joint_names:=[a, b: not a YAML value"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            command_line_parameters(["--ros-args", "-p", item])


def test_a_launch_argument_that_is_not_yaml_is_named():
    with pytest.raises(ValueError, match=re.escape("joint_names:=[a, b: not a YAML value")):
        launch_overrides({"joint_names": "[a, b"})
