"""The data that crosses the policy interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Observation:
    """One synchronised observation of the robot.

    images: camera name -> uint8 [H, W, 3] RGB (any size; resized with padding to the model's input)
    state: robot state vector in robot units (normalised inside the policy)
    instruction: the task in natural language
    timestamp: when the observation was taken, in seconds (ROS time or time.time())
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str
    timestamp: float = 0.0


@dataclass(frozen=True)
class ActionChunk:
    """actions [horizon, robot_action_dim] in robot units, for the observation taken at `timestamp`."""

    actions: np.ndarray
    timestamp: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    model_id: str = ""
    random_weights: bool = False
    handover: str = "switch"  # the hand-over mode it was made with (runtime/handover.py)
    frozen_steps: int = 0  # leading actions frozen to the previous chunk's (the delay it was given)

    def summary(self) -> dict:
        return {
            "actions_shape": list(self.actions.shape),
            "timestamp": self.timestamp,
            "steps": self.steps,
            "model_id": self.model_id,
            "random_weights": self.random_weights,
            "handover": self.handover,
            "frozen_steps": self.frozen_steps,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
