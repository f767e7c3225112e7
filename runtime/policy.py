"""The one interface the node, the sim bridge, evaluation and the tests use.

    infer(obs) -> ActionChunk               synchronous
    submit(obs) -> Future[ActionChunk]      asynchronous: returns at once, resolves when the chunk is ready
    both take `previous`: what the robot will still execute from its current chunk and the expected
    delay (runtime/handover.py), which the blend / inpaint / rtc hand-over modes join the new chunk to
    metadata                                what the policy serves: model id, horizon, action names, ...
    health() -> dict                        ready or not, counters, engine latency
    reset(), close()

Callers use only these; they never reach into an executor's buffers, threads or stages.
"""

from __future__ import annotations

import abc
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .handover import PreviousChunk
from .types import ActionChunk, Observation


class FrameDropped(RuntimeError):
    """The observation was replaced by a newer one before it was computed (newest wins)."""


class NonFiniteActions(RuntimeError):
    """The model produced NaN or inf actions (broken weights, an overflow in a low precision): the chunk
    fails instead of reaching the robot."""


@dataclass(frozen=True)
class PolicyMetadata:
    model_id: str  # the model's name and weights (checkpoint fingerprint or random seed)
    random_weights: bool  # no checkpoint: the actions are meaningless
    horizon: int  # actions per chunk offered to the robot (the checkpoint's n_action_steps)
    action_names: tuple[str, ...]  # one per action dimension, in order
    cameras: tuple[str, ...]  # the model's camera names, in order
    optional_cameras: tuple[str, ...]  # cameras that may be absent (masked)
    state_dim: int
    steps: int  # denoising steps per chunk by default
    device: str
    precision: str
    handover: str  # switch | blend | inpaint | rtc
    # The denoising noise a `submit` takes ([model horizon, model action dims]); () where not known
    noise_shape: tuple[int, ...] = ()


class Policy(abc.ABC):
    parts = None  # runtime.loading.PolicyParts: the model, its preparer and normalisation

    @abc.abstractmethod
    def infer(
        self, obs: Observation, noise: np.ndarray | None = None, previous: PreviousChunk | None = None
    ) -> ActionChunk:
        """Actions for one observation. `noise` [horizon, action_dim] fixes the sampler's start, so runs are
        reproducible and comparable; without it fresh Gaussian noise is drawn. `previous`: the executing
        chunk's remaining actions, for the hand-over mode (ignored by switch). Bad input raises ValueError
        naming the field, and the policy stays ready for the next observation."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget per-episode state (none for the reference policy; queued frames for the executor)."""

    def submit(
        self,
        obs: Observation,
        noise: np.ndarray | None = None,
        steps: int | None = None,
        previous: PreviousChunk | None = None,
    ) -> Future:
        """Queue an observation; the future resolves to its ActionChunk (or FrameDropped, when a newer
        observation replaced it). Bad input raises ValueError here. This default computes at once."""
        if steps is not None and steps != self.metadata.steps:
            raise ValueError(f"steps: this policy runs {self.metadata.steps} steps, not {steps}")
        future: Future = Future()
        future.set_result(self.infer(obs, noise, previous))
        return future

    @property
    def metadata(self) -> PolicyMetadata:
        config = self.parts.config
        return PolicyMetadata(
            model_id=self.parts.model_id,
            random_weights=self.parts.random_weights,
            horizon=config.model.chunk_length,
            action_names=config.action_names or tuple(f"a{i}" for i in range(config.robot_action_dim)),
            cameras=config.model.camera_names,
            optional_cameras=config.optional_camera_names,
            state_dim=config.state_dim,
            steps=config.denoising_steps,
            device=config.device,
            precision=config.precision,
            handover=config.handover,
            noise_shape=(config.model.action_horizon, config.model.action_dim),
        )

    def health(self) -> dict:
        """{"ready": bool, "state": "serving" | "hung" | "closed", "error": why not ready,
        "counters": {...}, "latency_ms": {stage: {p50, p99, ...}}}"""
        return {"ready": True, "state": "serving", "error": "", "counters": {}, "latency_ms": {}}

    def close(self) -> None:  # noqa: B027 - optional: only policies with threads or devices release them
        """Release threads and device memory; the policy serves no more."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
