"""The policy node's parameters: one table of name, default, description and check.

Each is declared with its type, range (where it has one) and description, so `ros2 param describe`
tells users what it does; every set, at start-up or at run time, goes through `check`, and a bad value
is refused with the reason while the node keeps running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import yaml

from ..graphs.config import PI0_CAMERAS, PRESETS

# The state_in_prompt parameter's values (words, not true/false: ROS would read those as booleans).
STATE_IN_PROMPT = {"auto": None, "with_state": True, "without_state": False}

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


def _device(v):
    return None if v == "cpu" or v.startswith("cuda") else "must be cpu or cuda[:N]"


PARAMS = (
    Param(
        "preset",
        "",
        "Model preset for random weights; empty = the checkpoint's model, or pi05_tiny without one.",
        _one_of("", *PRESETS),
        needs_reconfigure=True,
    ),
    Param(
        "checkpoint",
        "",
        "Checkpoint directory (openpi or lerobot); empty = random weights.",
        needs_reconfigure=True,
    ),
    Param(
        "action_horizon",
        0,
        "Actions the model generates per chunk; 0 = the checkpoint's (or preset's).",
        _in_range(0, 1000),
        (0, 1000),
        needs_reconfigure=True,
    ),
    Param(
        "n_action_steps",
        0,
        "Actions of each chunk offered to the robot; 0 = the checkpoint's (else the whole horizon).",
        _in_range(0, 1000),
        (0, 1000),
        needs_reconfigure=True,
    ),
    Param(
        "max_token_len",
        0,
        "Padded prompt length in tokens; 0 = the checkpoint's (or preset's).",
        _in_range(0, 4096),
        (0, 4096),
        needs_reconfigure=True,
    ),
    Param(
        "state_in_prompt",
        "auto",
        "pi0.5: with_state (the discretised state in the prompt) or without_state; auto = the checkpoint's.",
        _one_of(*STATE_IN_PROMPT),
        needs_reconfigure=True,
    ),
    Param(
        "allow_unnormalized",
        False,
        "Serve a trained checkpoint without normalisation statistics (actions in normalised units).",
        needs_reconfigure=True,
    ),
    Param(
        "tokenizer",
        "",
        "SentencePiece model; empty = the checkpoint's, or the demo tokenizer.",
        needs_reconfigure=True,
    ),
    Param(
        "robot", "", "Which assets/<robot>/norm_stats.json of the checkpoint to use.", needs_reconfigure=True
    ),
    Param("device", "cpu", "cpu or cuda[:N].", _device, needs_reconfigure=True),
    Param(
        "precision",
        "float32",
        "float32, bf16, or fp8 (the prefix's GEMMs in FP8, the rest bf16).",
        _one_of("float32", "bf16", "fp8"),
        needs_reconfigure=True,
    ),
    Param(
        "vision_precision",
        "",
        "The vision tower's precision (float32, bf16, fp16); empty = as precision.",
        _one_of("", "float32", "bf16", "fp16"),
        needs_reconfigure=True,
    ),
    Param(
        "fp8_expert",
        False,
        "With precision fp8: the action expert's GEMMs in FP8 too (faster, inside the accuracy gates).",
        needs_reconfigure=True,
    ),
    Param(
        "fp8_calibration",
        "",
        "FP8 activation scales (vla-runtime calibrate); empty = calibrate on synthetic frames at start-up.",
        needs_reconfigure=True,
    ),
    Param(
        "fp8_calibration_margin",
        1.25,
        "Headroom over the largest activation seen, when calibrating at start-up.",
        _in_range(1.0, 4.0),
        (1.0, 4.0),
        needs_reconfigure=True,
    ),
    Param(
        "record_observations",
        "",
        "Record every observation served to this MCAP file (for vla-runtime calibrate); empty = off.",
        needs_reconfigure=True,
    ),
    Param(
        "steps",
        0,
        "Denoising steps per chunk, 1..10; 0 = the checkpoint's (or 10).",
        _in_range(0, 10),
        (0, 10),
    ),
    Param(
        "seed",
        0,
        "Seed of random weights (no checkpoint).",
        _in_range(0, 2**31 - 1),
        (0, 2**31 - 1),
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
        "state_dim", 8, "Length of the robot state vector.", _in_range(1, 32), (1, 32), needs_reconfigure=True
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
        value = yaml.safe_load(text) if not isinstance(param.default, str) else text
        if isinstance(param.default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = type(param.default)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{name}:={text}: expected {expected.__name__}")
        reason = param.check(value)
        if reason:
            raise ValueError(f"{name}:={text}: {reason}")
        overrides[name] = value
    return overrides
