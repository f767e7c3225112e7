"""Event-driven chunk scheduling, and the one definition of latency and deadline miss.

Pure Python with the time passed in (seconds on whatever clock the caller runs: ROS time, sim time, a
fake clock in tests), so the node, the episode loop and the tests share it.

    observed(stamp, now)   an observation taken at `stamp` went to the policy; its deadline is
                           stamp + deadline_s
    offer(chunk, now)      a chunk finished: if it answers a newer observation than the current chunk,
                           it is what the robot gets, at once (the caller publishes it)
    check(now)             the deadline watch (a timer): observations whose deadline passed with no
                           fresh chunk are misses; the still-valid tail of the current chunk is returned
                           for publication, or nothing when the chunk is exhausted

Definitions (docs/robot.md has the timeline):
- age of a chunk = publication time - the stamp of the observation it answers;
- miss = an observation's deadline passed and no chunk for it or a newer observation had been published;
- tail = the current chunk republished from its first action still ahead, after a miss;
- exhausted = a miss when no action of the current chunk is still ahead (nothing is published);
- late chunk = a chunk that finished after a newer one was published (discarded).
Action k of a chunk is due at `stamp + k * period_s` and holds for one period: a chunk is aligned to the
moment its observation was taken, so actions whose period has ended are cut off before publication.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from .handover import PreviousChunk
from .timing import percentiles
from .types import ActionChunk

DEFAULT_DEADLINE_S = 0.05  # one control period at 20 Hz
# The expected delay of the next chunk: a high percentile of the recent ages, not the mean (a chunk later
# than expected would freeze too few actions; see `expected_delay_steps`).
DELAY_PERCENTILE = 95
DELAY_WINDOW = 50  # fresh chunks


@dataclass(frozen=True)
class ScheduledActions:
    chunk: ActionChunk
    first_index: int  # index into chunk.actions of the first action still valid
    actions: np.ndarray  # [n, dof] the actions from first_index on
    fresh: bool  # a new chunk (True) or the tail of the current one after a miss (False)
    age_s: float  # publication time - observation stamp


class ChunkScheduler:
    COUNTERS = ("observations", "fresh", "misses", "tails", "exhausted", "late_chunks")

    def __init__(self, period_s: float, deadline_s: float = DEFAULT_DEADLINE_S, window: int = 2000):
        for name, value in (("period_s", period_s), ("deadline_s", deadline_s)):
            if not value > 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        self.period_s, self.deadline_s = period_s, deadline_s
        self._lock = threading.Lock()
        self._current: ActionChunk | None = None
        self._pending: deque[float] = deque()  # stamps of observations not yet answered, oldest first
        self._ages_ms: deque[float] = deque(maxlen=window)
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    def observed(self, stamp: float) -> None:
        with self._lock:
            self.counters["observations"] += 1
            self._pending.append(stamp)

    def offer(self, chunk: ActionChunk, now: float) -> ScheduledActions | None:
        """A finished chunk (any thread). Returns what to publish now, or None for a late chunk."""
        with self._lock:
            if self._current is not None and chunk.timestamp <= self._current.timestamp:
                self.counters["late_chunks"] += 1
                return None
            self._count_misses(now, answered_up_to=chunk.timestamp)
            self._current = chunk
            self.counters["fresh"] += 1
            scheduled = self._due(chunk, now, fresh=True)
            if scheduled is None:
                self.counters["exhausted"] += 1  # every action's time passed while it was computed
            else:  # a stamp ahead of this clock (skew within max_future_s, a stopped sim clock): age 0
                self._ages_ms.append(max(0.0, scheduled.age_s) * 1e3)
            return scheduled

    def check(self, now: float) -> ScheduledActions | None:
        """The deadline watch: count misses; after one, the current chunk's still-valid tail."""
        with self._lock:
            if not self._count_misses(now) or self._current is None:
                return None
            scheduled = self._due(self._current, now, fresh=False)
            self.counters["tails" if scheduled is not None else "exhausted"] += 1
            return scheduled

    def _count_misses(self, now: float, answered_up_to: float | None = None) -> int:
        """Misses among the pending observations; those a chunk stamped `answered_up_to` answers leave."""
        missed = 0
        while self._pending and (
            self._pending[0] + self.deadline_s < now
            or (answered_up_to is not None and self._pending[0] <= answered_up_to)
        ):
            missed += int(self._pending.popleft() + self.deadline_s < now)
        self.counters["misses"] += missed
        return missed

    def _due(self, chunk: ActionChunk, now: float, fresh: bool) -> ScheduledActions | None:
        # Action k holds for [stamp + k * period, stamp + (k + 1) * period): the first still valid one is
        # the action whose period contains now.
        first = max(0, int(np.floor((now - chunk.timestamp) / self.period_s + 1e-9)))
        if first >= len(chunk.actions):
            return None
        return ScheduledActions(chunk, first, chunk.actions[first:], fresh, now - chunk.timestamp)

    def expected_delay_steps(self) -> int:
        """Actions of the current chunk the robot will have executed when the next chunk lands: the first
        index a chunk of the DELAY_PERCENTILE-th percentile age (over the last DELAY_WINDOW fresh chunks)
        delivers. 0 before any chunk. What real-time chunking freezes (issue 14)."""
        with self._lock:
            recent = list(self._ages_ms)[-DELAY_WINDOW:]
        if not recent:
            return 0
        age_s = float(np.percentile(recent, DELAY_PERCENTILE)) / 1e3
        return max(0, int(np.floor(age_s / self.period_s + 1e-9)))

    def previous_chunk(self, stamp: float) -> PreviousChunk | None:
        """What the robot will execute from the current chunk, aligned to an observation taken at `stamp`
        (its action 0 due at `stamp`), with the expected delay: the input of the blend / inpaint / rtc
        hand-over. None before any chunk, or when the current chunk ends before `stamp`."""
        delay = self.expected_delay_steps()
        with self._lock:
            current = self._current
        if current is None:
            return None
        offset = max(0, int(np.floor((stamp - current.timestamp) / self.period_s + 0.5)))
        if offset >= len(current.actions):
            return None
        return PreviousChunk(current.actions[offset:], delay)

    def figures(self) -> dict:
        """Counters, the age of published chunks (p50 / p99, ms), the expected delay in actions, and the
        current chunk's denoising steps, hand-over mode and frozen actions."""
        with self._lock:
            ages = percentiles(list(self._ages_ms), (50, 99))
            figures = {**self.counters, "age_p50_ms": ages["p50"], "age_p99_ms": ages["p99"]}
            current = self._current
        if current is not None:
            figures.update(steps=current.steps, handover=current.handover, frozen_steps=current.frozen_steps)
        return {**figures, "expected_delay_steps": self.expected_delay_steps()}

    def reset(self) -> None:
        """Forget the current chunk and pending observations (deactivation, a clock jump); keep counters."""
        with self._lock:
            self._current = None
            self._pending.clear()
