"""Observations assembled from separately arriving camera images, robot state and instruction.

Pure Python (no rclpy), with the time passed in, so it is tested on a fake clock.

Matching: every source keeps its stamped messages of the last `max_obs_age_s`. The observation's stamp
(its reference) is the oldest among the newest stamps of the sources it needs; each source contributes
its message closest to the reference, which must lie within `sync_tolerance_s`. Sources stamped
together (one driver, a simulator) match exactly; free-running 30 Hz cameras have an image within
17 ms of any instant, hence the default tolerance of 25 ms.

- Required cameras and the state must be present, matched and no older than `max_obs_age_s`.
- An optional camera takes part while it is alive; once its newest image is older than `max_obs_age_s`
  it is left out (the model masks it) instead of holding every observation back.
- A message stamped more than `max_future_s` ahead of the clock is refused (counted, not stored).
- `take` returns an observation only when its reference is newer than the last one taken.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..runtime.types import Observation

HISTORY_MAX = 2000  # messages kept per source at most (a 1 kHz joint state over 2 s)


class InputRefused(ValueError):
    """A message that cannot be used; `cause` is the counter it is reported under."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class AssemblySettings:
    required_cameras: tuple[str, ...]
    optional_cameras: tuple[str, ...] = ()
    sync_tolerance_s: float = 0.025
    max_obs_age_s: float = 0.5
    max_future_s: float = 0.1


class ObservationAssembler:
    STATE = "state"  # the state's source name beside the camera names

    def __init__(self, settings: AssemblySettings):
        self.settings = settings
        self._history: dict[str, deque[tuple[float, np.ndarray]]] = {}
        self._instruction: str | None = None
        self._last_taken: float | None = None
        self.waiting_for = "inputs"  # why the last `take` returned nothing, for diagnostics

    def add_image(self, camera: str, rgb: np.ndarray, stamp: float, now: float) -> None:
        self._add(camera, rgb, stamp, now)

    def add_state(self, state: np.ndarray, stamp: float, now: float) -> None:
        self._add(self.STATE, state, stamp, now)

    def set_instruction(self, text: str) -> None:
        self._instruction = text

    def _add(self, source: str, value, stamp: float, now: float) -> None:
        if stamp > now + self.settings.max_future_s:
            raise InputRefused(
                "future_stamps",
                f"header.stamp: {stamp - now:.3f} s ahead of this node's clock "
                f"(more than max_future_s {self.settings.max_future_s}); a clock not synchronised?",
            )
        history = self._history.setdefault(source, deque(maxlen=HISTORY_MAX))
        if history and stamp < history[-1][0] - self.settings.max_obs_age_s:
            history.clear()  # a source that went back in time (restarted): its old messages are void
        elif history and stamp < history[-1][0]:
            return  # arrived out of order (best effort): a newer message of this source is already here
        history.append((stamp, value))
        while history[0][0] < stamp - self.settings.max_obs_age_s:
            history.popleft()

    def take(self, now: float) -> Observation | None:
        """The newest complete observation not taken before, or None (`waiting_for` says why)."""
        s = self.settings
        alive = [
            c
            for c in s.optional_cameras
            if c in self._history and now - self._history[c][-1][0] <= s.max_obs_age_s
        ]
        sources = [*s.required_cameras, *alive, self.STATE]
        absent = [name for name in sources if name not in self._history]
        if absent or self._instruction is None:
            self.waiting_for = f"no {', '.join(absent or ['instruction'])} yet"
            return None
        reference = min(self._history[name][-1][0] for name in sources)
        if now - reference > s.max_obs_age_s:
            self.waiting_for = "stale"
            return None
        if self._last_taken is not None and reference <= self._last_taken:
            self.waiting_for = "nothing new"
            return None
        chosen = {}
        for name in sources:
            stamp, value = min(self._history[name], key=lambda item: abs(item[0] - reference))
            if abs(stamp - reference) > s.sync_tolerance_s:
                self.waiting_for = f"{name} not synchronised (nearest {stamp - reference:+.3f} s)"
                return None
            chosen[name] = value
        self._last_taken = reference
        self.waiting_for = ""
        state = chosen.pop(self.STATE)
        return Observation(chosen, state, self._instruction, reference)

    def reset(self) -> None:
        """Forget every buffered input (a clock jump, deactivation); the instruction stays."""
        self._history.clear()
        self._last_taken = None
