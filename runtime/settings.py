"""The settings a user gives the runtime, declared once.

Each is a field of `RuntimeConfig` (whose dataclass default is the setting's default), with its help,
its choices or range, and the value that stands for "not set" (RuntimeConfig's None) where a command
line or a ROS parameter cannot say None: "" for text, 0 for counts, "auto" for a tri-state. From this
table come the command line's model options (`cli.add_model_args`), the policy node's model parameters
(`nodes/params.py`, hence the launch arguments and the keys of policy.yaml), and the conversions between
a RuntimeConfig and either. RuntimeConfig itself checks the values, once, for every entry point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..graphs.config import PRESETS
from .config import COMPILE_SCOPES, DEVICE_WAITS, INTEGER_STAGES, PRECISION_MODES, PRECISIONS, RuntimeConfig
from .handover import HANDOVER_MODES, SCHEDULES
from .pipelining import PIPELINING_MODES

# state_in_prompt in words (a ROS parameter of true/false would be a bool and could not say "auto").
STATE_IN_PROMPT = {"auto": None, "with_state": True, "without_state": False}
RESIZE_ON_DEVICE = {"auto": None, "yes": True, "no": False}


@dataclass(frozen=True)
class Setting:
    name: str  # RuntimeConfig field, ROS parameter; --name-with-dashes on the command line
    help: str
    kind: type  # str, int, float or bool: what the command line and ROS carry
    unset: Any = None  # the command line's and ROS's value for RuntimeConfig's None
    choices: tuple = ()
    range: tuple[float, float] | None = None  # of a set value (not of `unset`)
    words: dict | None = None  # word -> RuntimeConfig value, for settings given in words
    live: bool = False  # a running node applies a change at once (others at the next configure)

    @property
    def default(self) -> Any:
        """RuntimeConfig's default, as the command line and ROS carry it."""
        return self.from_config(_CONFIG_DEFAULTS[self.name])

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def to_config(self, value: Any) -> Any:
        """A command-line or ROS value -> RuntimeConfig's (None where it means "not set")."""
        if self.words is not None:
            return self.words[value]
        return None if value is None or value == self.unset and self.unset is not None else value

    def from_config(self, value: Any) -> Any:
        if self.words is not None:
            return {v: k for k, v in self.words.items()}[value]
        return self.unset if value is None else value

    def check(self, value: Any) -> str | None:
        """Why a ROS value is refused (choices and range; RuntimeConfig checks the rest); `unset` is
        accepted."""
        if self.words is None and value == self.unset and self.unset is not None:
            return None
        return self.check_set(value)

    def check_set(self, value: Any) -> str | None:
        """Why a value given on the command line is refused (there, not giving it means not set)."""
        if self.words is not None:
            return None if value in self.words else f"must be one of {', '.join(map(repr, self.words))}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}"
        if self.range is not None and not self.range[0] <= value <= self.range[1]:
            return f"must be in [{self.range[0]}, {self.range[1]}]"
        return None


_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RuntimeConfig)}

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "preset",
        "model preset for random weights; none = the checkpoint's model, or pi05_tiny without one",
        str,
        "",
        choices=tuple(sorted(PRESETS)),
    ),
    Setting("checkpoint", "checkpoint directory (openpi or lerobot); none = random weights", str, ""),
    Setting(
        "action_horizon",
        "actions generated per chunk; none = the checkpoint's (or preset's)",
        int,
        0,
        range=(1, 1000),
    ),
    Setting(
        "n_action_steps",
        "actions of each chunk offered to the robot; none = the checkpoint's (else the whole horizon)",
        int,
        0,
        range=(1, 1000),
    ),
    Setting(
        "max_token_len",
        "padded prompt length in tokens; none = the checkpoint's (or preset's)",
        int,
        0,
        range=(1, 4096),
    ),
    Setting(
        "state_in_prompt",
        "pi0.5: with_state (the discretised state in the prompt) or without_state; auto = the checkpoint's",
        str,
        words=STATE_IN_PROMPT,
    ),
    Setting(
        "allow_unnormalized",
        "serve a trained checkpoint without normalisation statistics (actions in normalised units)",
        bool,
    ),
    Setting("tokenizer", "SentencePiece model; none = the checkpoint's, or the demo tokenizer", str, ""),
    Setting("robot", "which assets/<robot>/norm_stats.json of the checkpoint to use", str, ""),
    Setting("device", "cpu or cuda[:N]", str),
    Setting(
        "precision",
        "float32, bf16, fp8 (the prefix's GEMMs in FP8, the rest bf16; Hopper or Ada), int8 (both Gemma "
        "stacks' GEMMs W8A8) or w4a8 (4-bit weights, 8-bit activations, DuQuant smoothing)",
        str,
        choices=PRECISION_MODES,
    ),
    Setting(
        "vision_precision",
        "the SigLIP tower's precision; none = as precision",
        str,
        "",
        choices=tuple(sorted(PRECISIONS)),
    ),
    Setting("fp8_expert", "with precision fp8: the action expert's GEMMs in FP8 too", bool),
    Setting(
        "integer_stages",
        "int8 / w4a8: the Gemma stacks quantised: both, the prefix or the action expert; none = both with "
        "int8, the expert with w4a8",
        str,
        "",
        choices=INTEGER_STAGES,
    ),
    Setting(
        "compile_cache",
        "where compiled kernels are kept between runs (a directory per code, torch, GPU, model and "
        "precision); none = Inductor's default under /tmp",
        str,
    ),
    Setting(
        "precompile",
        "keep each compiled function whole in compile_cache and load it at the next start instead of "
        "tracing it (torch's experimental aot_compile); false: torch.compile traces at every start",
        bool,
    ),
    Setting(
        "keep_float_weights",
        "int8 / w4a8: keep the quantised GEMMs' float weights after the start-up gate (more memory; "
        "needed only to compare the two paths later)",
        bool,
    ),
    Setting(
        "force_precision",
        "int8 / w4a8: serve even when the quantised model misses its accuracy gate at start-up",
        bool,
    ),
    Setting(
        "integer_calibration",
        "w4a8: recorded observations (MCAP) the DuQuant smoothing is fitted on; none = synthetic frames",
        str,
        "",
    ),
    Setting(
        "fp8_calibration",
        "FP8 activation scales (`vla-runtime calibrate`); none = calibrated on synthetic frames at start-up",
        str,
        "",
    ),
    Setting(
        "fp8_calibration_margin",
        "headroom over the largest activation seen, when calibrating",
        float,
        range=(1.0, 4.0),
    ),
    Setting(
        "steps", "denoising steps per chunk, 1..10; none = the model's", int, 0, range=(1, 10), live=True
    ),
    Setting(
        "seed",
        "random weights and denoising noise: the same seed draws them again (on a GPU, actions then agree "
        "to bf16 rounding: docs/performance.md)",
        int,
        range=(0, 2**31 - 1),
    ),
    Setting("state_dim", "length of the robot's state vector", int, range=(1, 32)),
    Setting(
        "device_timeout_s",
        "a frame on the device longer than this is declared hung (its chunk fails, health says so); "
        "none = 10 s on a GPU, 600 s on the CPU",
        float,
        0.0,
        range=(0.1, 3600.0),
    ),
    Setting(
        "resize_on_device",
        "where camera images that are not the model's size are resized: yes = on the device (uint8 up as "
        "they came), no = on the host; auto = on a GPU, on the host with the CPU",
        str,
        words=RESIZE_ON_DEVICE,
    ),
    Setting(
        "pipelining",
        "frames on the device at once: throughput (consecutive frames overlap), latency (one at a time: "
        "each stage has the GPU to itself) or auto (latency first while observations arrive slower than "
        "a frame takes)",
        str,
        choices=PIPELINING_MODES,
    ),
    Setting(
        "device_wait",
        "how the host waits for a frame's chunk: spin (a CPU core busy while the device works: the lowest "
        "latency) or block (the thread sleeps: about 0.2 ms later, a core free for simulators or nodes)",
        str,
        choices=DEVICE_WAITS,
    ),
    Setting(
        "handover",
        "how a new chunk takes over from the executing one: switch, blend (cross-fade), inpaint (freeze the "
        "delayed actions while denoising) or rtc (freeze + guidance, real-time chunking)",
        str,
        choices=HANDOVER_MODES,
    ),
    Setting(
        "rtc_execution_horizon",
        "blend / inpaint / rtc: actions of the new chunk guided toward (or blended from) the old one",
        int,
        range=(1, 100),
    ),
    Setting("rtc_max_guidance_weight", "rtc: the clip of the guidance weight", float, range=(0.01, 1000.0)),
    Setting(
        "rtc_schedule",
        "rtc: the guidance mask's decay after the frozen actions",
        str,
        choices=SCHEDULES,
    ),
    Setting(
        "rtc_vjp_steps",
        "rtc: denoising steps (from the noise end) whose guidance takes the exact vector-Jacobian product, "
        "a backward pass through the expert each; the later ones take the Jacobian as the identity",
        int,
        range=(0, 10),
    ),
    Setting(
        "compile_scope",
        "what one torch.compile covers: stage (fuses across layers, the measured default) or layer (one "
        "compile serves every layer of a stack: a cold start of 15 s against the stage scope's 58, H200)",
        str,
        choices=COMPILE_SCOPES,
    ),
    Setting(
        "shape_profiles",
        "each frame runs the smallest shape that holds it: only the cameras present, the prompt padded to "
        "32 / 64 / 128 / max tokens (a new shape is captured when first met)",
        bool,
    ),
    Setting(
        "ahead_shapes",
        "shape_profiles: shapes captured at start besides the full one, as CAMERASxTOKENS items "
        "(2x64: two cameras, a prompt of up to 64 tokens with the state)",
        str,
        "",
    ),
    Setting(
        "capture_new_shapes",
        "shape_profiles: a frame of a shape not captured yet captures it (seconds with the device idle on a "
        "GPU); false: it runs in the smallest captured shape that holds it (on a robot: no stall)",
        bool,
    ),
    Setting(
        "adaptive_steps",
        "the node lowers the denoising steps (steps, 5, 3, 2) when chunks come close to the deadline and "
        "climbs back when they are well inside it",
        bool,
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}

# Settings only the executor reads (its streams, graphs, compiled functions, shapes and waits): the eager
# reference that `vla-runtime infer` runs does not, so infer refuses them instead of dropping them.
EXECUTOR_ONLY = frozenset(
    {
        "precompile",
        "device_timeout_s",
        "pipelining",
        "device_wait",
        "compile_scope",
        "shape_profiles",
        "ahead_shapes",
        "capture_new_shapes",
        "adaptive_steps",
    }
)

# RuntimeConfig fields that are not settings of their own, and why.
DERIVED_OR_INTERNAL = {
    "robot_action_dim": "the node: the number of joint_names",
    "action_names": "the node: joint_names",
    "optional_cameras": "the node: optional_cameras among cameras",
    "compile_stages": "measured default (experiments change it in code)",
    "fp8_calibration_frames": "calibration frames at start-up (FP8 on recordings: vla-runtime calibrate)",
    "max_image_side": "a guard against absurd images",
    "max_batch": "several robots in one batch (submit_batch); a node serves one robot",
    "batch_profiles": "with max_batch: which batch profiles are captured (a node serves one robot)",
    "garbage_collection": "its default chosen by the interpreter (runtime/collector.py); YAML may set it",
}


def config_values(get) -> dict[str, Any]:
    """RuntimeConfig keyword arguments from `get(name)` (a ROS parameter or a parsed argument)."""
    return {s.name: s.to_config(get(s.name)) for s in SETTINGS}


def setting_values(config: RuntimeConfig) -> dict[str, Any]:
    """The settings of a RuntimeConfig as the command line and ROS carry them."""
    return {s.name: s.from_config(getattr(config, s.name)) for s in SETTINGS}
