"""The LIBERO report's statistics."""

from __future__ import annotations

import pytest
from vla_runtime.sim.report import wilson_interval


def test_wilson_interval_of_a_success_rate():
    assert wilson_interval(0, 0) == [0.0, 1.0]
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.08  # no success in 50 trials: up to about 7% is still possible
    lo, hi = wilson_interval(25, 50)
    assert lo == pytest.approx(0.366, abs=1e-3) and hi == pytest.approx(0.634, abs=1e-3)
    lo, hi = wilson_interval(50, 50)
    assert 0.92 < lo < 0.95 and hi == 1.0
