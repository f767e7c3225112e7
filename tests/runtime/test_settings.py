"""One declaration of the user's settings (runtime/settings.py): every entry point offers each of them,
with the same default and check, and a configuration survives the trip through each."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
from vla_runtime.cli import build_parser, runtime_config_from_args
from vla_runtime.nodes.params import BY_NAME as NODE_PARAMS
from vla_runtime.nodes.params import runtime_config_from_params
from vla_runtime.nodes.ros_eval import node_params
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.settings import DERIVED_OR_INTERNAL, SETTINGS, config_values, setting_values

MODEL_COMMANDS = ("infer", "accuracy", "calibrate", "profile", "eval-libero", "demo")


def test_every_config_field_is_a_setting_or_says_why_not():
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    names = {s.name for s in SETTINGS}
    assert names | set(DERIVED_OR_INTERNAL) == fields and not names & set(DERIVED_OR_INTERNAL)


def test_the_node_declares_each_setting_with_its_default_and_check():
    for s in SETTINGS:
        param = NODE_PARAMS[s.name]
        assert param.default == s.default and type(param.default) is type(s.default), s.name
        assert param.needs_reconfigure is not s.live
        assert param.check(s.default) is None  # the default is accepted
        for bad in _refused(s):
            assert param.check(bad) is not None, (s.name, bad)


def _refused(s):
    if s.words is not None:
        return ["maybe"]
    if s.choices:
        return ["no-such-choice"]
    if s.range is not None:
        return [s.range[1] + 1]
    return []


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_each_command_with_a_model_offers_every_setting(command):
    options = {o for a in _subparsers(build_parser())[command]._actions for o in a.option_strings}
    assert {s.flag for s in SETTINGS} <= options


def random_settings(rng) -> dict:
    """Valid values for every setting a CPU run without a checkpoint takes (RuntimeConfig checks them)."""
    horizon = int(rng.integers(2, 60))
    return {
        "preset": str(rng.choice(["pi05_tiny", "pi0_tiny"])),
        "action_horizon": horizon,
        "n_action_steps": int(rng.integers(1, horizon + 1)),
        "max_token_len": int(rng.integers(48, 300)),
        "state_in_prompt": bool(rng.integers(2)),
        "allow_unnormalized": bool(rng.integers(2)),
        "device": "cpu",
        "precision": str(rng.choice(["float32", "bf16"])),
        "vision_precision": rng.choice([None, "float32", "bf16", "fp16"]),
        "fp8_calibration_margin": float(rng.uniform(1.0, 4.0)),
        "steps": int(rng.integers(1, 11)),
        "seed": int(rng.integers(0, 2**31 - 1)),
        "state_dim": int(rng.integers(1, 9)),  # the tiny presets act in 8 dims
        "device_timeout_s": float(rng.uniform(0.1, 100.0)),
        "resize_on_device": rng.choice([None, True, False]),
    }


@pytest.mark.parametrize("trial", range(5))
def test_a_config_survives_the_command_line_and_the_node(trial):
    rng = np.random.default_rng()
    values = random_settings(rng)
    if values["preset"] == "pi0_tiny":
        values["state_in_prompt"] = None  # pi0 has no state in its prompt
    config = RuntimeConfig(**values)
    carried = setting_values(config)

    # through the command line: the flags a user would type
    argv = ["infer"]
    for s in SETTINGS:
        value = carried[s.name]
        if s.kind is bool:
            argv += [s.flag] if value else []
        elif value not in ("", None) and not (s.unset == 0 and value == 0):
            argv += [s.flag, str(value)]
    from_cli = runtime_config_from_args(build_parser().parse_args(argv))

    # through the node: the parameters ros_eval gives it, read back as the node reads them
    params = {**{p.name: p.default for p in NODE_PARAMS.values()}, **node_params(config)}
    from_node = runtime_config_from_params(params.__getitem__)

    for s in SETTINGS:
        assert getattr(from_cli, s.name) == getattr(config, s.name), ("cli", s.name)
        assert getattr(from_node, s.name) == getattr(config, s.name), ("node", s.name)
    assert config_values(carried.__getitem__) == {s.name: getattr(config, s.name) for s in SETTINGS}


def test_images_are_resized_on_a_gpu_and_on_the_host_with_the_cpu_unless_told():
    """resize_on_device's auto (None): the device's resize measured faster on the H200
    (docs/performance.md); with the CPU the host's (the executor's thread would do the caller's work)."""
    assert RuntimeConfig(device="cuda").resizes_on_device
    assert RuntimeConfig(device="cuda:1").resizes_on_device
    assert not RuntimeConfig(device="cpu").resizes_on_device
    assert not RuntimeConfig(device="cuda", resize_on_device=False).resizes_on_device
    assert RuntimeConfig(device="cpu", resize_on_device=True).resizes_on_device
