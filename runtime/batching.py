"""When the policy server sends a batch: at once, or held for company (issue 15, item 2).

Sent at once, an observation never waits for another robot's. Under load that is what makes the server
fall behind: the device runs many small batches, each paying a batch's fixed cost (a batch of 8 takes
about 3.5x a batch of 1), and the frames queue behind them. Held a little, the same robots fill fewer,
fuller batches, and the device keeps up.

The rule, from two measurements (the arrival rate of observations over all robots, and each batch
profile's device time):
- the keep-up size is the smallest batch n whose device time is at most the time n observations take to
  arrive: S(profile(n)) <= n / rate. At light load it is 1, and nothing is ever held;
- fewer than that pending, the server holds them, but never past the latest start of the earliest
  deadline: deadline - margin - S(profile(pending + 1)); and not at all when the device is busy past
  that point anyway (holding would only make a late frame later);
- more than that pending, under load (a keep-up size above 1), a batch takes no more than the keep-up
  size's profile holds, earliest deadlines first. A larger batch would fall into a larger profile that
  takes longer, while more robots' observations pile up for the next one: measured on the H200 with
  LIBERO-shaped pi05 at 8 robots, the server sent at once settled into batches of 5 to 8 (37 ms each,
  p99 127 ms) although batches of 4 (24 ms) keep up.

A batch's device time is its completion minus the moment the device could start it (its issue, or the
previous batch's completion when that is later), the median of the last `window` batches of its
profile. A profile not yet seen is estimated from the smallest larger one seen (a smaller batch costs
no more), else linearly from the largest seen (a batch costs less than linear: the estimate errs high,
so the latest start comes early); none seen, nothing is held.

Pure Python with no clock of its own: the server feeds it times, the tests a fake clock.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable

import numpy as np

RATE_WINDOW_S = 1.0  # the arrival rate: observations in the last second
WINDOW = 32  # device times kept per batch profile


class BatchHold:
    COUNTERS = ("held",)  # batches that waited for company

    def __init__(
        self,
        profile_of: Callable[[int], int],
        max_batch: int,
        margin_s: float,
        hold: bool = True,
        window: int = WINDOW,
    ):
        self.profile_of, self.max_batch, self.margin_s, self.hold = profile_of, max_batch, margin_s, hold
        self._arrivals: deque[float] = deque()
        self._device_s: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._in_flight = 0
        self._last_done = float("-inf")
        self._busy_until = float("-inf")  # when the device should be done with what it was given
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    def arrived(self, at: float) -> None:
        """An observation was submitted at `at` (seconds, the server's monotonic clock)."""
        with self._lock:
            self._arrivals.append(at)
            self._forget_before(at - RATE_WINDOW_S)

    def issued(self, size: int, at: float) -> None:
        """A batch of `size` went to the executor at `at`."""
        with self._lock:
            self._in_flight += 1
            expected = self._estimate(size)
            if expected is not None:
                self._busy_until = max(at, self._busy_until) + expected

    def served(self, size: int, issued: float, done: float, ok: bool = True) -> None:
        """A batch of `size` issued at `issued` completed at `done` (`ok`: with chunks, so its time is
        a device time)."""
        with self._lock:
            if ok:
                self._device_s[self.profile_of(size)].append(done - max(issued, self._last_done))
            self._last_done = max(self._last_done, done)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_until = done

    def hold_s(self, pending: int, earliest_deadline: float, now: float) -> float:
        """How long to hold `pending` observations (the earliest due at `earliest_deadline`) before
        sending them as one batch: 0 sends now."""
        if not self.hold or pending >= self.max_batch:
            return 0.0
        with self._lock:
            self._forget_before(now - RATE_WINDOW_S)
            if pending >= self._keep_up_size():
                return 0.0
            expected = self._estimate(pending + 1)
            if expected is None:
                return 0.0
            latest_start = earliest_deadline - self.margin_s - expected
            if self._busy_until > latest_start:
                return 0.0
            return max(0.0, latest_start - now)

    def batch_limit(self, now: float) -> int:
        """The most observations the next batch takes: under load the keep-up size's profile, else
        `max_batch`."""
        if not self.hold:
            return self.max_batch
        with self._lock:
            self._forget_before(now - RATE_WINDOW_S)
            keep_up = self._keep_up_size()
        return self.max_batch if keep_up == 1 else min(self.max_batch, self.profile_of(keep_up))

    def count_held(self) -> None:
        """A batch was sent after waiting for company."""
        with self._lock:
            self.counters["held"] += 1

    def device_ms(self) -> dict[str, float]:
        """Per batch profile seen: its median device time (ms)."""
        with self._lock:
            return {str(p): float(np.median(v)) * 1e3 for p, v in sorted(self._device_s.items()) if v}

    def keep_up_size(self, now: float) -> int:
        with self._lock:
            self._forget_before(now - RATE_WINDOW_S)
            return self._keep_up_size()

    def _keep_up_size(self) -> int:
        rate = len(self._arrivals) / RATE_WINDOW_S
        if rate == 0:
            return 1
        for n in range(1, self.max_batch + 1):
            expected = self._estimate(n)
            if expected is None:
                return 1  # nothing measured yet: send at once (and measure)
            if expected <= n / rate:
                return n
        return self.max_batch  # overloaded: full batches are the most the device can do

    def _estimate(self, n: int) -> float | None:
        seen = {p: float(np.median(v)) for p, v in self._device_s.items() if v}
        if not seen:
            return None
        profile = self.profile_of(n)
        larger = [p for p in seen if p >= profile]
        if larger:
            return seen[min(larger)]
        largest = max(seen)
        return seen[largest] * profile / largest

    def _forget_before(self, t: float) -> None:
        while self._arrivals and self._arrivals[0] < t:
            self._arrivals.popleft()
