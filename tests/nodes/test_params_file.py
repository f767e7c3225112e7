"""The shipped parameter file names only declared parameters, each with a value of its declared type and
one that the parameter's own check accepts (so `ros2 launch` with the defaults configures)."""

from __future__ import annotations

from pathlib import Path

import yaml
from vla_runtime.nodes.params import PARAMS

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
