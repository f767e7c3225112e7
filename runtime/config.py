"""Runtime configuration: which model, where, in what precision, and how the robot's data maps onto it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import yaml

from ..graphs.checkpoint import CheckpointInfo, architecture_differences, inspect_checkpoint
from ..graphs.config import PRESETS, ModelConfig, get_preset
from .buffers import BATCH_PROFILE_SETS, prompt_bucket
from .collector import DEFAULT_GARBAGE_COLLECTION, GARBAGE_COLLECTION, generational_thresholds
from .handover import Handover
from .pipelining import PIPELINING_MODES

# Stages that run faster compiled, measured on an H100 (benchmarks/results/2026-11-22-h100-80gb-hbm3.json,
# graphs with and without torch.compile): prefix 6.84 vs 11.49 ms, denoise 10.15 vs 30.21 ms; vision was not
# faster compiled (2.72 vs 2.62 ms, an earlier run) and takes longest to compile, so it is captured
# uncompiled. Inductor's max-autotune mode made the denoise loop slower (14.9 vs 11.5 ms, same run,
# ...-stage-experiments-1-max-autotune.json), so every stage uses the default mode.
MEASURED_COMPILE_STAGES = ("prefix", "denoise")

PRECISIONS = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INTEGER_PRECISIONS = ("int8", "w4a8")  # the Gemma stacks' GEMMs in integers (runtime/integer_precision.py)
PRECISION_MODES = ("float32", "bf16", "fp8", *INTEGER_PRECISIONS)
INTEGER_STAGES = ("both", "prefix", "expert")  # which Gemma stacks int8 / w4a8 quantise
# Unless `integer_stages` says: w4a8 the action expert only (its 4-bit prefix misses the gate on pi05 and,
# bound by compute at hundreds of tokens, gains least from 4-bit weights), int8 both stacks.
DEFAULT_INTEGER_STAGES = {"int8": "both", "w4a8": "expert"}
# The settings behind each precision option the benchmarks compare on a GPU (fp8_all: every FP8 option)
GPU_PRECISION_OPTIONS = {
    "fp8_all": dict(precision="fp8", vision_precision="fp16", fp8_expert=True),
    "fp8": dict(precision="fp8", vision_precision="fp16"),
    "bf16": dict(precision="bf16"),
    "int8": dict(precision="int8"),
    "w4a8": dict(precision="w4a8"),
}

DEFAULT_PRESET = "pi05_tiny"  # random weights, when neither a preset nor a checkpoint is given
# Cameras that may be absent unless the configuration says otherwise (openpi's LIBERO and DROID setups
# leave the right wrist slot empty); lerobot's `empty_camera_<i>` slots are always absent.
DEFAULT_OPTIONAL_CAMERAS = ("right_wrist_0_rgb",)
# Model settings a RuntimeConfig may give; with a checkpoint, one that contradicts what the checkpoint
# states is refused (n_action_steps is the robot's choice of how much of a chunk to execute, so it may
# differ from a lerobot checkpoint's).
MODEL_OVERRIDES = ("action_horizon", "n_action_steps", "max_token_len", "state_in_prompt")


DEVICE_TIMEOUT_S = {"cuda": 10.0, "cpu": 600.0}
NOISE_STREAM = 1  # the noise generator's stream beside `seed` (the weights use `seed` alone)


COMPILE_SCOPES = ("stage", "layer")  # RuntimeConfig.compile_scope
DEVICE_WAITS = ("spin", "block")  # RuntimeConfig.device_wait


@dataclass(frozen=True)
class RuntimeConfig:
    # Random weights: a preset names the model (default pi05_tiny). With a checkpoint, the checkpoint names
    # it, and a preset given as well must be the same architecture.
    preset: str | None = None
    checkpoint: str | None = None  # directory with model.safetensors + config.json; None = random weights
    action_horizon: int | None = None  # None = the checkpoint's, else the preset's
    n_action_steps: int | None = None  # actions of a chunk offered to the robot; None = the checkpoint's
    max_token_len: int | None = None  # padded prompt length
    state_in_prompt: bool | None = None  # pi0.5: the discretised state in the prompt; None = the checkpoint's
    allow_unnormalized: bool = False  # serve a trained checkpoint that has no normalisation statistics
    robot: str | None = None  # which assets/<robot>/norm_stats.json to use
    tokenizer: str | None = None  # SentencePiece model; default: the checkpoint's, else the demo tokenizer
    device: str = "cpu"
    precision: str = "float32"  # float32 | bf16 | fp8 (the prefix's GEMMs in FP8, the rest bf16; Hopper/Ada)
    vision_precision: str | None = None  # None = same as `precision`; fp16 on GPUs
    steps: int | None = None  # denoising steps 1..10; None = the preset's default
    state_dim: int = 8  # length of the robot's state vector (LIBERO: eef pos 3 + axis-angle 3 + gripper 2)
    robot_action_dim: int = 7  # leading action dims the robot executes (LIBERO: 7)
    action_names: tuple[str, ...] | None = None  # a name per robot action dim (joints); None = a0, a1, ...
    optional_cameras: tuple[str, ...] | None = None  # may be absent (zero image, masked); None = the default
    seed: int = 0  # random weights
    # torch.compile before graph capture: True/False for every stage, None = the measured default on CUDA
    # (MEASURED_COMPILE_STAGES), nothing on the CPU.
    compile_stages: bool | None = None
    # What one torch.compile covers: a whole stage (Inductor fuses across its layers) or one layer, whose
    # compile serves every layer of the stack (a start traces 3 layers, not 3 stacks).
    compile_scope: str = "stage"
    fp8_calibration: str | None = None  # activation scales: loaded if the file exists, else calibrated, saved
    fp8_calibration_frames: int = 8  # synthetic frames when no scales file is given; w4a8: also recorded ones
    fp8_calibration_margin: float = 1.25  # headroom over the largest activation seen
    fp8_expert: bool = False  # with precision fp8: the action expert's GEMMs in FP8 too
    force_precision: bool = False  # int8 / w4a8: serve even when the start-up accuracy gate fails
    integer_stages: str | None = None  # int8 / w4a8: both, prefix or expert; None = DEFAULT_INTEGER_STAGES
    keep_float_weights: bool = False  # int8 / w4a8: keep the float weights after the start-up gate
    integer_calibration: str | None = (
        None  # w4a8: MCAP observations the smoothing is fitted on; None = synthetic
    )
    compile_cache: str = "~/.cache/vla_runtime/compile"  # runtime/compile_cache.py; "none": Inductor's own
    precompile: bool = True  # runtime/precompiled.py: compiled functions kept whole in compile_cache
    max_image_side: int = 4096
    # Images not of the model's size resized on the device (uint8 up as they came) instead of on the host;
    # None = on a GPU (measured faster there: docs/performance.md), on the host with the CPU
    resize_on_device: bool | None = None
    # A frame on the device longer than this is declared hung (the watchdog fails its future and health
    # says so); also the bound on reset/close waiting for the device. None = DEVICE_TIMEOUT_S.
    device_timeout_s: float | None = None
    # How a new chunk takes over from the executing one (runtime/handover.py).
    handover: str = "switch"  # switch | blend | inpaint | rtc
    # Frames on the device at once (runtime/pipelining.py): throughput (overlapped), latency (one at a
    # time) or auto (by the input rate). Throughput stays the default until the GPU comparison is made.
    pipelining: str = "throughput"
    rtc_execution_horizon: int = 10  # end of the guided / blended region, in actions
    rtc_max_guidance_weight: float = 10.0
    rtc_schedule: str = "exp"  # exp | linear | ones | zeros
    rtc_vjp_steps: int = 2  # rtc: denoising steps with the exact vector-Jacobian product (the rest: identity)
    # Fewer denoising steps under deadline pressure (runtime/adaptive.py): the ladder's denoise graphs are
    # captured ahead of time.
    adaptive_steps: bool = False
    # Observations of several robots computed together (PipelinedExecutor.submit_batch): up to this many,
    # in batch profiles captured ahead of time; one copy of the weights.
    max_batch: int = 1
    # Which batch profiles (runtime/buffers.py, BATCH_PROFILE_SETS): "powers_of_two" (1, 2, 4, 8: a batch
    # of 5 costs a batch of 8) or "every_size" (1 to max_batch: more captures at start, about 2.4x the
    # buffers at 8; simulated, it served spread robots best with the server sending at once, not capped:
    # docs/many_robots.md).
    batch_profiles: str = "powers_of_two"
    # Python's full garbage collections (runtime/collector.py): "automatic" (CPython's, start-up frozen
    # out of them) or "while_device_busy" (on the GPU, the executor runs them right after putting a frame
    # alone on the device; CPython 3.11-3.13 with the GIL, and the default there).
    garbage_collection: str = DEFAULT_GARBAGE_COLLECTION
    # Each frame runs the smallest shape that holds it: only the cameras present are computed, the prompt
    # padded to the next of 32 / 64 / 128 / max tokens (the padding is masked: the same actions). A new
    # shape is captured when first met (the device idle meanwhile).
    shape_profiles: bool = False
    # With shape_profiles: shapes captured at start besides the full one, for every batch profile, as
    # "CAMERASxTOKENS" items: "2x64" is two cameras and a prompt of up to 64 tokens (with the state).
    ahead_shapes: str | None = None
    # With shape_profiles: a frame of a shape not captured yet captures it (the device idle meanwhile:
    # seconds on a GPU); false: it runs in the smallest captured shape that holds it, which on a robot
    # turns a camera that drops out into a larger shape instead of a stall.
    capture_new_shapes: bool = True
    # How the executor's completion thread waits for a frame's last event: "spin" (CUDA's default: a CPU
    # core busy for the frame's whole device time) or "block" (the thread sleeps until the device signals
    # it). Measured on an H200 (pi05, FP8, 20 Hz): block used 3.3 ms of CPU a frame instead of 17.1 and
    # answered 0.24 ms later (benchmarks/device_wait_bench.py). Spin for the lowest latency; block where
    # the CPU is shared (simulators beside the policy, a robot's few cores).
    device_wait: str = "spin"

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        for name in ("action_horizon", "n_action_steps", "max_token_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(
                f"compile_scope: must be one of {', '.join(COMPILE_SCOPES)}, got {self.compile_scope!r}"
            )
        if self.device_wait not in DEVICE_WAITS:
            raise ValueError(
                f"device_wait: must be one of {', '.join(DEVICE_WAITS)}, got {self.device_wait!r}"
            )
        if self.pipelining not in PIPELINING_MODES:
            raise ValueError(
                f"pipelining: must be one of {', '.join(PIPELINING_MODES)}, got {self.pipelining!r}"
            )
        if self.integer_calibration and self.precision != "w4a8":
            raise ValueError(
                f"integer_calibration: fits the w4a8 smoothing, not used with precision {self.precision}"
            )
        if self.fp8_calibration and self.precision != "fp8":
            raise ValueError(f"fp8_calibration: scales are for precision fp8, not {self.precision}")
        if self.robot and not self.checkpoint:
            raise ValueError("robot: names a checkpoint's statistics; no checkpoint given")
        if not 1.0 <= self.fp8_calibration_margin <= 4.0:
            raise ValueError(f"fp8_calibration_margin: must be in [1, 4], got {self.fp8_calibration_margin}")
        if self.action_names is not None and len(self.action_names) != self.robot_action_dim:
            raise ValueError(
                f"action_names: {len(self.action_names)} names for robot_action_dim {self.robot_action_dim}"
            )
        if self.fp8_calibration_frames < 1:
            raise ValueError(f"fp8_calibration_frames: must be at least 1, got {self.fp8_calibration_frames}")
        if self.precision not in PRECISION_MODES:
            raise ValueError(
                f"precision: must be one of {', '.join(PRECISION_MODES)}, got {self.precision!r}"
            )
        if self.precision == "fp8" and not self.device.startswith("cuda"):
            raise ValueError("precision: fp8 needs a CUDA GPU with FP8 tensor cores (Ada or Hopper)")
        if self.integer_stages is not None and self.integer_stages not in INTEGER_STAGES:
            raise ValueError(
                f"integer_stages: must be one of {', '.join(INTEGER_STAGES)}, got {self.integer_stages!r}"
            )
        if self.integer_stages is not None and self.precision not in INTEGER_PRECISIONS:
            raise ValueError(
                f"integer_stages: chooses the stacks int8 / w4a8 quantise, not used with precision "
                f"{self.precision}"
            )
        if self.fp8_expert and self.precision != "fp8":
            raise ValueError("fp8_expert: needs precision fp8")
        if self.vision_precision is not None and self.vision_precision not in PRECISIONS:
            raise ValueError(
                f"vision_precision: must be one of {sorted(PRECISIONS)}, got {self.vision_precision!r}"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: must be cpu or cuda[:N], got {self.device!r}")
        model = self.model
        if self.steps is not None and not 1 <= self.steps <= 10:
            raise ValueError(f"steps: must be in 1..10, got {self.steps}")
        if self.batch_profiles not in BATCH_PROFILE_SETS:
            raise ValueError(
                f"batch_profiles: must be one of {', '.join(BATCH_PROFILE_SETS)}, got {self.batch_profiles!r}"
            )
        if self.max_batch not in BATCH_PROFILE_SETS[self.batch_profiles]:
            sizes = BATCH_PROFILE_SETS[self.batch_profiles]
            raise ValueError(
                f"max_batch: must be one of {sizes} with {self.batch_profiles} profiles, got {self.max_batch}"
            )
        if self.garbage_collection not in GARBAGE_COLLECTION:
            raise ValueError(
                f"garbage_collection: must be one of {', '.join(GARBAGE_COLLECTION)}, "
                f"got {self.garbage_collection!r}"
            )
        if self.garbage_collection == "while_device_busy" and not generational_thresholds():
            raise ValueError(
                "garbage_collection: while_device_busy needs CPython 3.11 to 3.13 with the GIL (its "
                "collector's third threshold); use automatic"
            )
        if self.device_timeout_s is not None and not self.device_timeout_s > 0:
            raise ValueError(f"device_timeout_s: must be > 0, got {self.device_timeout_s}")
        if not 1 <= self.state_dim <= model.action_dim:
            raise ValueError(
                f"state_dim: must be in 1..{model.action_dim} for {model.name}, got {self.state_dim}"
            )
        if not 1 <= self.robot_action_dim <= model.action_dim:
            raise ValueError(
                f"robot_action_dim: must be in 1..{model.action_dim}, got {self.robot_action_dim}"
            )
        self.handover_settings  # noqa: B018 - checks the handover fields
        integer_expert = self.quantised_stages in ("both", "expert")
        if self.handover == "rtc" and integer_expert and self.rtc_vjp_steps > 0:
            raise ValueError(
                f"handover: rtc with rtc_vjp_steps > 0 differentiates through the action expert, whose "
                f"{self.precision} GEMMs round (no useful gradient); set rtc_vjp_steps 0 (identity "
                "Jacobian), or integer_stages prefix"
            )
        if self.handover == "rtc" and self.fp8_expert and self.rtc_vjp_steps > 0:
            raise ValueError(
                "handover: rtc with rtc_vjp_steps > 0 differentiates through the action expert, whose FP8 "
                "GEMMs have no backward; set rtc_vjp_steps 0 (identity Jacobian), or fp8_expert false"
            )
        if self.ahead_shapes and not self.shape_profiles:
            raise ValueError("ahead_shapes: shapes other than the full one need shape_profiles")
        self.ahead_shape_sizes  # noqa: B018 - checks ahead_shapes
        unknown = set(self.optional_cameras or ()) - set(model.camera_names)
        if unknown:
            raise ValueError(
                f"optional_cameras: {sorted(unknown)} are not cameras of {model.name} "
                f"({', '.join(model.camera_names)})"
            )

    @cached_property
    def ahead_shape_sizes(self) -> tuple[tuple[int, int], ...]:
        """`ahead_shapes` as (views, prompt length) pairs, each length its bucket (buffers.prompt_bucket)."""
        model, sizes = self.model, []
        for item in filter(None, (i.strip() for i in (self.ahead_shapes or "").split(","))):
            views, _, tokens = item.partition("x")
            if not (views.isdigit() and tokens.isdigit()):
                raise ValueError(f"ahead_shapes: {item!r} is not CAMERASxTOKENS (e.g. 2x64)")
            if not 1 <= int(views) <= model.num_views:
                raise ValueError(
                    f"ahead_shapes: {item!r} has {views} cameras; {model.name} has 1..{model.num_views}"
                )
            if not 1 <= int(tokens) <= model.max_token_len:
                raise ValueError(
                    f"ahead_shapes: {item!r} has {tokens} tokens; the prompt holds 1..{model.max_token_len}"
                )
            sizes.append((int(views), prompt_bucket(int(tokens), model.max_token_len)))
        return tuple(dict.fromkeys(sizes))

    @cached_property
    def checkpoint_info(self) -> CheckpointInfo | None:
        return inspect_checkpoint(self.checkpoint) if self.checkpoint else None

    @cached_property
    def model(self) -> ModelConfig:
        """The model served: the checkpoint's (config.json and tensor header), else the preset's, with the
        explicit settings applied."""
        info = self.checkpoint_info
        if info is None:
            base = get_preset(self.preset or DEFAULT_PRESET)
        else:
            base = info.model
            if self.preset is not None:
                check_preset_fits(get_preset(self.preset), info)
            for name in MODEL_OVERRIDES:
                value = getattr(self, name)
                if name in info.stated and value is not None and value != info.stated[name]:
                    raise ValueError(
                        f"{name}: {value!r} was asked, but checkpoint {info.directory.name} says "
                        f"{info.stated[name]!r} ({info.sources.get(name, 'its config')})"
                    )
        overrides = {name: getattr(self, name) for name in MODEL_OVERRIDES if getattr(self, name) is not None}
        return base.replace(**overrides)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def optional_camera_names(self) -> tuple[str, ...]:
        """Cameras that may be absent: the configured ones (default: the right wrist where the model has
        one) and every `empty_camera_<i>` slot of a lerobot checkpoint."""
        cameras = self.model.camera_names
        chosen = self.optional_cameras if self.optional_cameras is not None else DEFAULT_OPTIONAL_CAMERAS
        empty = tuple(c for c in cameras if c.startswith("empty_camera_"))
        return tuple(c for c in cameras if c in chosen) + tuple(c for c in empty if c not in chosen)

    @property
    def handover_settings(self) -> Handover:
        return Handover(
            self.handover,
            self.rtc_execution_horizon,
            self.rtc_max_guidance_weight,
            self.rtc_schedule,
            self.rtc_vjp_steps,
        )

    @property
    def quantised_stages(self) -> str | None:
        """int8 / w4a8: the Gemma stacks in integers (both, prefix or expert); None in other precisions."""
        if self.precision not in INTEGER_PRECISIONS:
            return None
        return self.integer_stages or DEFAULT_INTEGER_STAGES[self.precision]

    @property
    def resizes_on_device(self) -> bool:
        if self.resize_on_device is None:
            return self.device.startswith("cuda")
        return self.resize_on_device

    @property
    def denoising_steps(self) -> int:
        return self.steps or self.model.default_steps

    @property
    def use_compile(self) -> tuple[str, ...]:
        """The stages to torch.compile."""
        if self.compile_stages is None:
            return MEASURED_COMPILE_STAGES if self.device.startswith("cuda") else ()
        return ("vision", "prefix", "denoise") if self.compile_stages else ()

    @property
    def compute_dtype(self) -> torch.dtype:
        """What is not quantised computes in bf16 with fp8; with int8 / w4a8 in bf16 on a GPU, float32
        on a CPU (which has no fast bf16)."""
        if self.precision in INTEGER_PRECISIONS:
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return torch.bfloat16 if self.precision == "fp8" else PRECISIONS[self.precision]

    @property
    def vision_dtype(self) -> torch.dtype:
        return PRECISIONS[self.vision_precision] if self.vision_precision else self.compute_dtype

    @property
    def device_timeout(self) -> float:
        """Seconds a frame may stay on the device: as set, else a GPU's or a CPU's default (a full-size
        model on a CPU takes seconds per frame)."""
        if self.device_timeout_s is not None:
            return self.device_timeout_s
        return DEVICE_TIMEOUT_S["cpu" if self.device == "cpu" else "cuda"]

    def noise_generator(self) -> np.random.Generator:
        """Where a policy draws the denoising noise it is not given: seeded by `seed` (a stream apart from
        the random weights'), so the same seed and inputs repeat a run's actions."""
        return np.random.default_rng([self.seed, NOISE_STREAM])

    def replace(self, **changes) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> RuntimeConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict) -> RuntimeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        for name in ("optional_cameras", "action_names"):
            if data.get(name) is not None:
                data = {**data, name: tuple(data[name])}
        return cls(**data)


def check_preset_fits(preset: ModelConfig, info: CheckpointInfo) -> None:
    wrong = [w.replace("asked", "preset", 1) for w in architecture_differences(preset, info.model)]
    if wrong:
        raise ValueError(
            f"preset: {preset.name} is not the architecture of checkpoint {info.directory.name} "
            f"(leave --preset out to take the checkpoint's): " + "; ".join(wrong)
        )
