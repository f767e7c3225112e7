"""How many frames the executor keeps on the device at once: latency first, or throughput (issue 16,
item 5).

throughput  up to MAX_IN_FLIGHT frames, the stages of consecutive frames overlapping on their streams:
            the most chunks per second, but each stage shares the GPU with the next frame's, so one frame
            takes longer than it would alone.
latency     one frame at a time: each stage has the GPU to itself; a frame that arrives meanwhile waits
            (newest wins, as always).
auto        by the input rate: while observations arrive further apart than a frame takes on the device,
            a frame never waits for the one before it, so latency first costs nothing and is chosen;
            when they arrive faster, one at a time would fall behind, so throughput. Thresholds
            `margin` apart on each side (hysteresis), on the medians of the last `window` arrivals and
            frames, so one odd frame does not flip it.

Pure Python with no clock of its own: the executor feeds it arrival times and service times (from the
frame's dispatch to its chunk), the tests a fake sequence.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

PIPELINING_MODES = ("auto", "latency", "throughput")
WINDOW = 20
MARGIN = 0.15


class PipeliningChooser:
    COUNTERS = ("to_latency", "to_throughput")

    def __init__(self, setting: str, max_in_flight: int, window: int = WINDOW, margin: float = MARGIN):
        if setting not in PIPELINING_MODES:
            raise ValueError(f"pipelining: must be one of {', '.join(PIPELINING_MODES)}, got {setting!r}")
        self.setting = setting
        self.max_in_flight = max_in_flight
        self.margin = margin
        self.mode = "throughput" if setting == "throughput" else "latency"  # auto starts latency first
        self._arrivals: deque[float] = deque(maxlen=window + 1)
        self._service_s: deque[float] = deque(maxlen=window)
        self._min_samples = max(2, window // 2)
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    def in_flight_limit(self) -> int:
        return 1 if self.mode == "latency" else self.max_in_flight

    def arrived(self, at: float) -> None:
        """A frame was submitted at `at` (seconds, any monotonic clock)."""
        with self._lock:
            self._arrivals.append(at)
            self._choose()

    def served(self, seconds: float) -> None:
        """A frame took `seconds` from its dispatch to its chunk."""
        with self._lock:
            self._service_s.append(seconds)
            self._choose()

    def _choose(self) -> None:
        if self.setting != "auto" or len(self._arrivals) <= self._min_samples:
            return
        if len(self._service_s) < self._min_samples:
            return
        interval = float(np.median(np.diff(self._arrivals)))
        service = float(np.median(self._service_s))
        if self.mode == "latency" and interval < service * (1 - self.margin):
            self.mode = "throughput"
            self.counters["to_throughput"] += 1
        elif self.mode == "throughput" and interval > service * (1 + self.margin):
            self.mode = "latency"
            self.counters["to_latency"] += 1

    def report(self) -> dict:
        with self._lock:
            return {"setting": self.setting, "mode": self.mode, **self.counters}
