"""fleet_sim's stops of the whole process (benchmarks/fleet_sim.py, ProcessStops): sized against the clock,
counted, and over when the block ends. Counted events only, no duration asserted."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fleet_sim import ProcessStops  # noqa: E402


def test_stops_are_counted_and_end_with_the_block():
    with ProcessStops(stop_ms=2.0, every_s=0.005, seed=1) as stops:
        assert stops._n > 0  # a loop sized for 2 ms
        give_up = time.monotonic() + 30.0
        while stops.count < 3 and time.monotonic() < give_up:
            time.sleep(0.01)
    assert stops.count >= 3
    ended = stops.count
    time.sleep(0.05)
    assert stops.count == ended and not stops._thread.is_alive()
