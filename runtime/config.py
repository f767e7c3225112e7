"""Runtime configuration: which model, where, in what precision, and how the robot's data maps onto it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..graphs.config import PRESETS, ModelConfig, get_preset

# Stages that run faster compiled, measured on an H100 (benchmarks/results/2026-11-22-h100-80gb-hbm3.json,
# graphs with and without torch.compile): prefix 6.84 vs 11.49 ms, denoise 10.15 vs 30.21 ms; vision was not
# faster compiled (2.72 vs 2.62 ms, an earlier run) and takes longest to compile, so it is captured
# uncompiled. Inductor's max-autotune mode made the denoise loop slower (14.9 vs 11.5 ms, same run,
# ...-stage-experiments-1-max-autotune.json), so every stage uses the default mode.
MEASURED_COMPILE_STAGES = ("prefix", "denoise")

PRECISIONS = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    preset: str = "pi05_tiny"
    checkpoint: str | None = None  # directory with model.safetensors + config.json; None = random weights
    robot: str | None = None  # which assets/<robot>/norm_stats.json to use
    tokenizer: str | None = None  # SentencePiece model; default: the checkpoint's, else the demo tokenizer
    device: str = "cpu"
    precision: str = "float32"  # float32 | bf16 | fp8 (the prefix's GEMMs in FP8, the rest bf16; Hopper/Ada)
    vision_precision: str | None = None  # None = same as `precision`; fp16 on GPUs
    steps: int | None = None  # denoising steps 1..10; None = the preset's default
    state_dim: int = 8  # length of the robot's state vector (LIBERO: eef pos 3 + axis-angle 3 + gripper 2)
    robot_action_dim: int = 7  # leading action dims the robot executes (LIBERO: 7)
    optional_cameras: tuple[str, ...] = ("right_wrist_0_rgb",)  # may be absent: zero image, masked out
    seed: int = 0  # random weights
    # torch.compile before graph capture: True/False for every stage, None = the measured default on CUDA
    # (MEASURED_COMPILE_STAGES), nothing on the CPU.
    compile_stages: bool | None = None
    fp8_calibration: str | None = (
        None  # activation scales: loaded if the file exists, else calibrated and saved
    )
    fp8_calibration_frames: int = 8
    fp8_expert: bool = False  # with precision fp8: the action expert's GEMMs in FP8 too
    max_image_side: int = 4096

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        if self.precision not in ("float32", "bf16", "fp8"):
            raise ValueError(f"precision: must be float32, bf16 or fp8, got {self.precision!r}")
        if self.precision == "fp8" and not self.device.startswith("cuda"):
            raise ValueError("precision: fp8 needs a CUDA GPU with FP8 tensor cores (Ada or Hopper)")
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
        if not 1 <= self.state_dim <= model.action_dim:
            raise ValueError(
                f"state_dim: must be in 1..{model.action_dim} for {self.preset}, got {self.state_dim}"
            )
        if not 1 <= self.robot_action_dim <= model.action_dim:
            raise ValueError(
                f"robot_action_dim: must be in 1..{model.action_dim}, got {self.robot_action_dim}"
            )
        unknown = set(self.optional_cameras) - set(model.camera_names)
        if unknown:
            raise ValueError(
                f"optional_cameras: {sorted(unknown)} are not cameras of {self.preset} "
                f"({', '.join(model.camera_names)})"
            )

    @property
    def model(self) -> ModelConfig:
        return get_preset(self.preset)

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
        return torch.bfloat16 if self.precision == "fp8" else PRECISIONS[self.precision]

    @property
    def vision_dtype(self) -> torch.dtype:
        return PRECISIONS[self.vision_precision] if self.vision_precision else self.compute_dtype

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
        if "optional_cameras" in data:
            data = {**data, "optional_cameras": tuple(data["optional_cameras"])}
        return cls(**data)
