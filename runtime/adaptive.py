"""Adaptive denoising steps: fewer steps when the deadline is under pressure, back up when it is not.

A ladder of step counts (the configured steps, then 5, 3, 2 below it), each with its denoise graph
captured ahead of time (StageRunner.add_steps: the denoise stage only). After every fresh chunk the
controller predicts the next chunk's age at the current rung from the recent ages (the latest one, or a
high percentile of the last few when that is higher: one slow frame is enough to act) and steps down one
rung when that would pass `pressure` of the deadline; it climbs one rung after `calm_chunks` chunks in a
row whose age, plus the extra denoising steps of the rung above (their time per step measured on the same
chunks), stays under `calm` of the deadline. The gap between the two thresholds and the run of calm
chunks are the hysteresis: a rung is not left and retaken every chunk. A frame still in flight past
`pressure` of the deadline is evidence too (`overdue`): the next frame steps down before it arrives.

Pure Python with no clock of its own: the node feeds it the ages its scheduler measures, the tests a
fake sequence.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

LOWER_RUNGS = (5, 3, 2)  # below the configured steps
WINDOW = 10  # chunks the prediction looks at
PERCENTILE = 90


def steps_ladder(top: int) -> tuple[int, ...]:
    """The configured steps, then the lower rungs below it, descending."""
    return (top, *(s for s in LOWER_RUNGS if s < top))


class StepsController:
    COUNTERS = ("steps_down", "steps_up")

    def __init__(
        self,
        top_steps: int,
        deadline_s: float,
        pressure: float = 0.8,
        calm: float = 0.6,
        calm_chunks: int = 20,
    ):
        if not 0 < calm < pressure <= 1:
            raise ValueError(f"calm ({calm}) and pressure ({pressure}): need 0 < calm < pressure <= 1")
        self.ladder = steps_ladder(top_steps)
        self.deadline_s, self.pressure, self.calm, self.calm_chunks = deadline_s, pressure, calm, calm_chunks
        self._rung = 0
        self._ages: deque[float] = deque(maxlen=WINDOW)  # at the current rung
        self._step_s: deque[float] = deque(maxlen=WINDOW)  # denoise time per step, any rung
        self._calm_run = 0
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    @property
    def steps(self) -> int:
        """The steps the next frame should use."""
        with self._lock:
            return self.ladder[self._rung]

    def observe(self, age_s: float, steps: int, denoise_ms: float | None) -> int:
        """A fresh chunk made with `steps` arrived `age_s` after its observation; `denoise_ms` is its
        denoise stage time (CUDA events) where known. Returns the steps for the next frame."""
        with self._lock:
            if denoise_ms is not None and steps > 0:
                self._step_s.append(denoise_ms / 1e3 / steps)
            if steps != self.ladder[self._rung]:
                return self.ladder[self._rung]  # made before the last change: says nothing about this rung
            self._ages.append(age_s)
            predicted = max(age_s, float(np.percentile(self._ages, PERCENTILE)))
            if predicted > self.pressure * self.deadline_s and self._rung < len(self.ladder) - 1:
                self._move(+1, "steps_down")
            elif self._rung > 0 and self._step_s:
                extra = (self.ladder[self._rung - 1] - steps) * float(np.median(self._step_s))
                self._calm_run = self._calm_run + 1 if predicted + extra < self.calm * self.deadline_s else 0
                if self._calm_run >= self.calm_chunks:
                    self._move(-1, "steps_up")
            return self.ladder[self._rung]

    def overdue(self, age_s: float, steps: int) -> int:
        """A frame made with `steps` is still in flight `age_s` after its observation. When that already
        passes `pressure` of the deadline, the next frame steps down now, before the slow chunk arrives:
        at the onset of a load one chunk is late, not two. Acts once per rung: the old frame's steps are
        no longer the current rung's after the move. Returns the steps for the next frame."""
        with self._lock:
            at_this_rung = steps == self.ladder[self._rung]
            if at_this_rung and age_s > self.pressure * self.deadline_s and self._rung < len(self.ladder) - 1:
                self._move(+1, "steps_down")
            return self.ladder[self._rung]

    def _move(self, direction: int, counter: str) -> None:
        self._rung += direction
        self.counters[counter] += 1
        self._ages.clear()
        self._calm_run = 0

    def figures(self) -> dict:
        with self._lock:
            return {**self.counters, "adaptive_steps": self.ladder[self._rung]}
