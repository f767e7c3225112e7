"""Deadline-driven chunk scheduling: what to send to the robot on each control tick.

Pure Python with an injected clock (seconds), so it is tested on a fake clock; the ROS node and the sim
bridge drive it from their timers.

Action k of a chunk is due at `obs_time + k * period`: a chunk is aligned to the moment its
observation was taken, not to when inference finished. On every tick:
- a chunk that arrived since the last tick replaces the current one (a newer observation wins);
- if none arrived, the tick is a deadline miss and the current chunk's remaining tail is sent again;
- either way, actions whose time has passed are cut off; if none remain, nothing is sent (exhausted).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .types import ActionChunk


@dataclass(frozen=True)
class ScheduledActions:
    chunk: ActionChunk
    first_index: int  # index into chunk.actions of the first action still ahead
    actions: np.ndarray  # [n, dof] the actions from first_index on
    fresh: bool  # True when this chunk arrived since the previous tick


class DeadlineScheduler:
    def __init__(self, period_s: float):
        if not period_s > 0:
            raise ValueError(f"period_s: must be positive, got {period_s}")
        self.period_s = period_s
        self._current: ActionChunk | None = None
        self._incoming: ActionChunk | None = None
        self._lock = threading.Lock()
        self.counters = {
            "ticks": 0,
            "fresh": 0,
            "misses": 0,
            "exhausted": 0,
            "late_chunks": 0,
            "superseded": 0,
        }

    def offer(self, chunk: ActionChunk) -> None:
        """A finished chunk (any thread). Only one newer than what is current or waiting is kept."""
        with self._lock:
            newest = self._incoming or self._current
            if newest is not None and chunk.timestamp <= newest.timestamp:
                self.counters["late_chunks"] += 1  # an older observation finished after a newer one
                return
            if self._incoming is not None:
                self.counters["superseded"] += 1
            self._incoming = chunk

    def tick(self, now: float) -> ScheduledActions | None:
        with self._lock:
            self.counters["ticks"] += 1
            fresh = self._incoming is not None
            if fresh:
                self._current, self._incoming = self._incoming, None
                self.counters["fresh"] += 1
            elif self._current is not None:
                self.counters["misses"] += 1
            chunk = self._current
            if chunk is None:
                return None
            first = max(0, int(np.ceil((now - chunk.timestamp) / self.period_s - 1e-9)))
            if first >= len(chunk.actions):
                self.counters["exhausted"] += 1
                return None
            return ScheduledActions(chunk, first, chunk.actions[first:], fresh)

    def reset(self) -> None:
        with self._lock:
            self._current = self._incoming = None
