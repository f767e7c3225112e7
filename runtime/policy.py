"""The one interface the node, the sim bridge and the tests use."""

from __future__ import annotations

import abc

import numpy as np

from .types import ActionChunk, Observation


class Policy(abc.ABC):
    @abc.abstractmethod
    def infer(self, obs: Observation, noise: np.ndarray | None = None) -> ActionChunk:
        """Actions for one observation. `noise` [horizon, action_dim] fixes the sampler's start, so runs are
        reproducible and comparable; without it fresh Gaussian noise is drawn. Bad input raises ValueError
        naming the field, and the policy stays ready for the next observation."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget per-episode state (none for the reference policy; queued frames for the executor)."""
