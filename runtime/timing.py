"""Latency statistics and Chrome / Perfetto traces of the executor's streams."""

from __future__ import annotations

import json
import threading
from collections import defaultdict, deque
from pathlib import Path

import numpy as np


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


class LatencyStats:
    """Rolling windows of per-metric samples in milliseconds (thread-safe)."""

    def __init__(self, window: int = 2000):
        self._samples: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self._lock = threading.Lock()

    def add(self, metric: str, ms: float) -> None:
        with self._lock:
            self._samples[metric].append(ms)

    def add_all(self, timings: dict[str, float]) -> None:
        for k, v in timings.items():
            self.add(k, v)

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                k: {**percentiles(v), "mean": float(np.mean(v)), "n": len(v)}
                for k, v in self._samples.items()
            }

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()

    def table(self) -> str:
        rows = [f"{'stage':12s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'mean ms':>9s} {'n':>6s}"]
        for k, s in sorted(self.summary().items()):
            rows.append(
                f"{k:12s} {s['p50']:9.3f} {s['p90']:9.3f} {s['p99']:9.3f} {s['mean']:9.3f} {s['n']:6d}"
            )
        return "\n".join(rows)


class TraceRecorder:
    """Complete events ("ph": "X") per stream lane, in the Chrome trace format Perfetto opens."""

    def __init__(self, max_events: int = 20_000):
        self._events: deque = deque(maxlen=max_events)
        self._lock = threading.Lock()

    def add(self, lane: str, name: str, start_ms: float, end_ms: float, frame: int) -> None:
        with self._lock:
            self._events.append((lane, name, start_ms, end_ms, frame))

    def events(self) -> list[tuple]:
        with self._lock:
            return list(self._events)

    def to_chrome(self) -> dict:
        lanes = {}
        out = []
        for lane, name, start, end, frame in self.events():
            tid = lanes.setdefault(lane, len(lanes) + 1)
            out.append(
                {
                    "name": name,
                    "cat": lane,
                    "ph": "X",
                    "pid": 1,
                    "tid": tid,
                    "ts": start * 1e3,
                    "dur": max(end - start, 0.0) * 1e3,
                    "args": {"frame": frame},
                }
            )
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": lane}}
            for lane, tid in lanes.items()
        ]
        return {"traceEvents": meta + out, "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome()))
        return path
