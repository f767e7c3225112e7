"""Static tensors of the pipelined executor, allocated once per shape profile and written in place.

Two kinds:
- device slots (`DeviceSlot`, two of them): every tensor a stage graph reads or writes. Frame N uses slot
  N % 2 from input to output, so while frame N's vision writes slot i, frame N-1's prefix and frame
  N-2's denoise read the other tensors they need without being overwritten.
- pinned host staging (`HostSlot`, a ring of `HOST_RING` entries): where the caller's numpy arrays land
  before the one asynchronous host-to-device copy, and where the actions land after the one copy back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graphs.config import ModelConfig

PIPELINE_SLOTS = 2
BATCH_SIZES = (1, 2, 4, 8)  # batch profiles: a batch of n runs in the smallest that holds it
# The sets of batch profiles an executor can capture (RuntimeConfig.batch_profiles), up to its max_batch.
BATCH_PROFILE_SETS = {"powers_of_two": BATCH_SIZES, "every_size": tuple(range(1, BATCH_SIZES[-1] + 1))}
PROMPT_BUCKETS = (32, 64, 128)  # with shape profiles: a prompt runs in the smallest that holds it
# Host staging is only reused after its frame has finished, and at most MAX_IN_FLIGHT frames are on the
# device at once, so a ring one longer than that can never overwrite what a copy still reads.
MAX_IN_FLIGHT = 3
HOST_RING = MAX_IN_FLIGHT + 1


@dataclass(frozen=True)
class ShapeProfile:
    """Everything that fixes a graph's shapes. Each profile gets its own buffers and graphs."""

    views: int
    prompt_len: int
    steps: int
    batch: int = 1

    def __post_init__(self):
        if not 1 <= self.steps <= 10:
            raise ValueError(f"steps: must be in 1..10, got {self.steps}")
        if not 1 <= self.batch <= BATCH_SIZES[-1]:
            raise ValueError(f"batch: must be in 1..{BATCH_SIZES[-1]}, got {self.batch}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What fixes the buffers and the vision and prefix graphs (the steps only fix the denoise graph)."""
        return (self.views, self.prompt_len, self.batch)


def batch_sizes(max_batch: int, kind: str = "powers_of_two") -> tuple[int, ...]:
    """The batch profiles an executor serving up to `max_batch` observations at once captures."""
    return tuple(b for b in BATCH_PROFILE_SETS[kind] if b < max_batch) + (batch_profile(max_batch, kind),)


def prompt_bucket(tokens: int, max_len: int) -> int:
    """The smallest prompt length among PROMPT_BUCKETS (and the model's max_len) that holds `tokens`."""
    return next((b for b in PROMPT_BUCKETS if tokens <= b < max_len), max_len)


def batch_profile(n: int, kind: str = "powers_of_two") -> int:
    """The smallest batch profile of the set `kind` (BATCH_PROFILE_SETS) that holds n observations."""
    sizes = BATCH_PROFILE_SETS[kind]
    for b in sizes:
        if n <= b:
            return b
    raise ValueError(f"batch: at most {sizes[-1]} observations at once, got {n}")


def largest_batch(robots: int, kind: str = "powers_of_two") -> int:
    """A server's largest batch for `robots` robots: the smallest profile that holds them all, or the
    largest profile of the set when none does (the robots beyond it wait for the next batch)."""
    return batch_profile(min(robots, BATCH_PROFILE_SETS[kind][-1]), kind)


def _input_shapes(cfg: ModelConfig, p: ShapeProfile) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    s = cfg.vision.image_size
    return {
        "pixels": ((p.batch, p.views, s, s, 3), torch.uint8),  # [B, V, S, S, 3]
        "image_masks": ((p.batch, p.views), torch.bool),  # [B, V]
        "tokens": ((p.batch, p.prompt_len), torch.int64),  # [B, L]
        "token_masks": ((p.batch, p.prompt_len), torch.bool),  # [B, L]
        "state": ((p.batch, cfg.action_dim), torch.float32),  # [B, A]
        "noise": ((p.batch, cfg.action_horizon, cfg.action_dim), torch.float32),  # [B, H, A]
        # previous actions, guidance weights, frozen entries (runtime/handover.py)
        "handover": ((p.batch, 3, cfg.action_horizon, cfg.action_dim), torch.float32),  # [B, 3, H, A]
    }


class DeviceSlot:
    """Inputs, stage boundaries and outputs of one pipeline slot, on the device."""

    def __init__(self, cfg: ModelConfig, p: ShapeProfile, device: torch.device, dtype: torch.dtype):
        for name, (shape, dt) in _input_shapes(cfg, p).items():
            setattr(self, name, torch.zeros(shape, dtype=dt, device=device))
        prefix_len = p.views * cfg.vision.tokens_per_image + p.prompt_len
        lm = cfg.prefix_lm
        self.image_tokens = torch.zeros(
            p.batch, p.views * cfg.vision.tokens_per_image, lm.width, dtype=dtype, device=device
        )  # [B, V*T, D]
        self.kv_cache = torch.zeros(
            lm.depth, 2, p.batch, lm.num_kv_heads, prefix_len, lm.head_dim, dtype=dtype, device=device
        )  # [layers, k/v, B, Hkv, P, Dh]
        self.prefix_mask = torch.zeros(p.batch, prefix_len, dtype=torch.bool, device=device)  # [B, P]
        self.actions = torch.zeros(
            p.batch, cfg.action_horizon, cfg.action_dim, dtype=torch.float32, device=device
        )  # [B, H, A]

    def input(self, name: str) -> torch.Tensor:
        return getattr(self, name)


class HostSlot:
    """Pinned (page-locked, when a GPU is used) host copies of one frame's inputs and outputs."""

    def __init__(self, cfg: ModelConfig, p: ShapeProfile, pin: bool):
        self.inputs = {
            name: torch.zeros(shape, dtype=dt, pin_memory=pin)
            for name, (shape, dt) in _input_shapes(cfg, p).items()
        }
        self.actions = torch.zeros(
            p.batch, cfg.action_horizon, cfg.action_dim, dtype=torch.float32, pin_memory=pin
        )


class StaticBuffers:
    def __init__(self, cfg: ModelConfig, profile: ShapeProfile, device: torch.device, dtype: torch.dtype):
        self.profile = profile
        self.device_slots = [DeviceSlot(cfg, profile, device, dtype) for _ in range(PIPELINE_SLOTS)]
        self.host_ring = [HostSlot(cfg, profile, pin=device.type == "cuda") for _ in range(HOST_RING)]

    def nbytes(self) -> int:
        tensors = [t for s in self.device_slots for t in vars(s).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)
