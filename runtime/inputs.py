"""Host-side input preparation: validate an Observation and turn it into fixed-shape arrays.

Everything here is numpy on the CPU, shared by the eager reference and the pipelined executor, so the
two see identical inputs. The uint8 -> [-1, 1] float conversion happens on the device, inside the
vision stage (`pixels_to_model_input`). With `resize_on_device`, an image that is not the model's size
is checked here but kept as it came (`PreparedInputs.raw_images`): it goes to the device as uint8 and is
resized there (`place_raw_images`, the same arithmetic as the host's `resize_with_pad`), where a large
frame's bilinear resize costs a few kernels instead of milliseconds of host time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..graphs.config import ModelConfig
from ..graphs.normalization import NormStats
from ..graphs.tokenizer import PromptTokenizer
from .types import Observation


@dataclass
class PreparedInputs:
    """Fixed-shape model inputs for one observation (batch of one)."""

    pixels: np.ndarray  # uint8 [V, S, S, 3], S = the model's image size
    image_masks: np.ndarray  # bool [V]
    tokens: np.ndarray  # int64 [L]
    token_masks: np.ndarray  # bool [L]
    state: np.ndarray  # float32 [action_dim], normalised and zero-padded
    # resize_on_device: view index -> its uint8 [H, W, 3] image, to be resized on the device into that
    # view of `pixels` (left black here); empty otherwise
    raw_images: dict[int, np.ndarray] = field(default_factory=dict)
    # The prompt length a shape profile must hold for this observation: its tokens, or for a prompt that
    # carries the state (pi0.5) at least the tokens with every state value at its widest, so the bucket
    # follows the instruction and does not flip with the state from frame to frame (a new bucket is a
    # capture: seconds with the device idle).
    prompt_room: int = 0

    def pixels_on(self, device: torch.device) -> torch.Tensor:
        """uint8 [V, S, S, 3] on `device`, the raw images resized there."""
        pixels = torch.tensor(self.pixels, device=device)  # a copy, also on the CPU: these stay as they are
        place_raw_images(pixels, self.raw_images)
        return pixels


def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: bilinear resize keeping the aspect ratio, black padding
    centred (openpi_client.image_tools.resize_with_pad, which openpi's training transforms and its LIBERO
    client use: Pillow's bilinear filter)."""
    if image.shape[:2] == (size, size):
        return image
    out = torch.empty((1, size, size, 3), dtype=torch.uint8)
    resize_into(torch.from_numpy(np.ascontiguousarray(image))[None], out)
    return out[0].numpy()


def resize_into(images: torch.Tensor, out: torch.Tensor) -> None:
    """uint8 [N, H, W, 3] resized with padding into `out` uint8 [N, S, S, 3] (black around each), on their
    device; each image on its own, in one call."""
    h, w = images.shape[1:3]
    size = out.shape[1]
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    # antialias: Pillow's bilinear filter, which openpi resizes with (so the checkpoints were trained on
    # it), widens with the downscale; plain bilinear samples 4 pixels and aliases
    # (tests/runtime/test_resize_on_device.py). In float32 on both the CPU and a GPU (which has no uint8
    # kernel for it), so the host's and the device's resize are the same arithmetic; torch's uint8 kernel
    # on the CPU would be 3-6x faster but rounds differently (one level on a tenth of the pixels).
    nchw = images.permute(0, 3, 1, 2).float()
    resized = F.interpolate(nchw, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - rh) // 2, (size - rw) // 2
    out.zero_()
    out[:, top : top + rh, left : left + rw] = (
        resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    )


def place_raw_images(pixels: torch.Tensor, raw_images: dict[int, np.ndarray]) -> None:
    """pixels uint8 [N, S, S, 3] on a device; raw_images: index into it -> uint8 [H, W, 3]. Each image
    copied up as it is and resized into its place. Images of one size at consecutive places go up in one
    copy and are resized in one call (a call is a handful of kernels, and launching each costs more than
    its work on a LIBERO frame)."""
    for first, images in _consecutive_runs_of_one_size(raw_images):
        raw = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=pixels.is_cuda)
        np.stack(images, out=raw.numpy())
        # pinned, so the copy queues on the current stream instead of waiting for it
        resize_into(raw.to(pixels.device, non_blocking=True), pixels[first : first + len(images)])


# A run's float32 copy on the device grows with its images: cut at about 100 MB (8 robots' 256 renders
# are 1 million pixels; 3 cameras of 720x1280 are 2.8 million)
MAX_RUN_PIXELS = 1 << 23


def _consecutive_runs_of_one_size(raw_images: dict[int, np.ndarray]):
    """(first index, [images]) for each run of consecutive indices whose images have one shape, of at
    most MAX_RUN_PIXELS pixels (one image more where a single image is larger)."""
    run_first, run = None, []
    for index in sorted(raw_images):
        image = raw_images[index]
        full = (len(run) + 1) * image.shape[0] * image.shape[1] > MAX_RUN_PIXELS
        if run and (index != run_first + len(run) or image.shape != run[0].shape or full):
            yield run_first, run
            run = []
        if not run:
            run_first = index
        run.append(image)
    if run:
        yield run_first, run


def pixels_to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, V, S, S, 3] -> float32 [B, V, 3, S, S] in [-1, 1]."""
    return pixels.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


class InputPreparer:
    def __init__(
        self,
        model: ModelConfig,
        tokenizer: PromptTokenizer,
        norm_stats: NormStats | None,
        state_dim: int,
        optional_cameras: tuple[str, ...] = (),
        max_image_side: int = 4096,
        resize_on_device: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        self.state_dim = state_dim
        self.optional_cameras = frozenset(optional_cameras)
        self.max_image_side = max_image_side
        self.resize_on_device = resize_on_device

    def __call__(self, obs: Observation) -> PreparedInputs:
        if not isinstance(obs, Observation):
            raise ValueError(f"observation: expected an Observation, got {type(obs).__name__}")
        pixels, masks, raw = self._images(obs.images)
        state = self._state(obs.state)
        normalized = self.norm_stats.normalize_state(state) if self.norm_stats else state
        # pi0.5 reads the (normalised) state from the prompt, unless trained without it (openpi's
        # pi05_libero); pi0 reads it from a continuous state token.
        prompt_state = normalized if self.model.prompt_has_state else None
        tokens, token_masks = self.tokenizer(obs.instruction, prompt_state)
        room = int(token_masks.sum())
        if prompt_state is not None:  # the widest state: every value in the top bin ("255")
            widest = np.ones_like(prompt_state)
            room = max(room, min(len(self.tokenizer.token_ids(obs.instruction, widest)), len(tokens)))
        padded = np.zeros(self.model.action_dim, dtype=np.float32)
        padded[: self.state_dim] = normalized
        return PreparedInputs(pixels, masks, tokens, token_masks, padded, raw, prompt_room=room)

    def check_instruction(self, instruction) -> None:
        """ValueError naming the instruction when its prompt is too long whatever the state (every state
        value at its shortest, in pi0.5's prompt): a node checks an instruction as it arrives."""
        shortest = -np.ones(self.state_dim, dtype=np.float32) if self.model.prompt_has_state else None
        ids = self.tokenizer.token_ids(instruction, shortest)
        if len(ids) > self.tokenizer.max_len:
            raise ValueError(
                f"instruction: the prompt is at least {len(ids)} tokens, over the model's max_token_len "
                f"of {self.tokenizer.max_len}"
            )

    def _images(self, images) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        if not isinstance(images, dict):
            raise ValueError(f"images: expected a dict of camera name -> image, got {type(images).__name__}")
        cameras = self.model.camera_names
        unknown = sorted(set(images) - set(cameras))
        if unknown:
            raise ValueError(f"images: unknown camera(s) {unknown}; this model's cameras are {list(cameras)}")
        missing = sorted(set(cameras) - set(images) - self.optional_cameras)
        if missing:
            raise ValueError(f"images: missing camera(s) {missing}")
        size = self.model.vision.image_size
        pixels = np.zeros((len(cameras), size, size, 3), dtype=np.uint8)
        masks = np.zeros(len(cameras), dtype=bool)
        raw: dict[int, np.ndarray] = {}
        for i, name in enumerate(cameras):
            if name not in images:
                continue  # an absent optional camera: black image, masked out of attention (as openpi)
            image = images[name]
            field = f"images[{name!r}]"
            if not isinstance(image, np.ndarray):
                raise ValueError(f"{field}: expected a numpy array, got {type(image).__name__}")
            if image.dtype != np.uint8:
                raise ValueError(f"{field}: dtype must be uint8, got {image.dtype}")
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"{field}: shape must be [H, W, 3], got {list(image.shape)}")
            if not (
                1 <= image.shape[0] <= self.max_image_side and 1 <= image.shape[1] <= self.max_image_side
            ):
                raise ValueError(
                    f"{field}: size {image.shape[1]}x{image.shape[0]} outside 1..{self.max_image_side}"
                )
            if min(image.shape[:2]) * size < max(image.shape[:2]):  # its short side would resize to 0
                raise ValueError(
                    f"{field}: size {image.shape[1]}x{image.shape[0]} is narrower than 1:{size}, the most "
                    f"a {size}x{size} model input can hold"
                )
            if self.resize_on_device and image.shape[:2] != (size, size):
                raw[i] = np.array(image)  # a copy: the caller's array may change after submit
            else:
                pixels[i] = resize_with_pad(image, size)
            masks[i] = True
        return pixels, masks, raw

    def _state(self, state) -> np.ndarray:
        try:
            state = np.asarray(state, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError("state: must be a vector of numbers") from None
        if state.ndim != 1 or state.shape[0] != self.state_dim:
            raise ValueError(f"state: expected {self.state_dim} values, got shape {list(state.shape)}")
        if not np.all(np.isfinite(state)):
            bad = np.flatnonzero(~np.isfinite(state)).tolist()
            raise ValueError(f"state: non-finite values (NaN or inf) at indices {bad}")
        return state
