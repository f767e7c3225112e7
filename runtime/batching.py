"""When the policy server sends a batch: at once, or held for company (issue 15, item 2).

Sent at once, an observation never waits for another robot's, and a batch takes every robot waiting.
Under load neither is best. Small batches each pay a batch's fixed cost (on the H200 a batch of 8 takes
2.2 to 3.3x a batch of 1). A batch that spills into a larger profile takes longer while more robots pile
up for the next one, which spills too: measured on the H200, the cap below took the worst p99 of 8
LIBERO-shaped robots per GPU from 126 to 78 ms (docs/many_robots.md). Sized to what keeps up, the device
keeps up with the smallest batches that can.

The rule, from two measurements (the observations that arrived in the last second, and each batch
profile's device time):
- the keep-up size is the smallest batch n whose device time is at most the time n observations take to
  arrive: S(profile(n)) <= n / rate; never more than the robots that submitted in that second (there is
  no company to wait for beyond them). At light load it is 1, and nothing is ever held;
- fewer than that pending, the server holds them, but never past the latest start of the earliest
  deadline: deadline - margin - S(profile(pending + 1)); and not at all when the device is busy past
  that point anyway (holding would only make a late frame later);
- more than that pending, under load (a keep-up size above 1), a batch takes no more than the keep-up
  size's profile holds, earliest deadlines first; unless every robot seen waits, or the robots tick
  together (below) and what waits is their whole newest burst, and one batch of all of them would still
  end before the earliest deadline (less the margin): then nobody else is due before the next tick, and
  it takes them all (8 robots ticking together on the H200's device times: one batch of 8 ends at 39 ms,
  two of 4 at 24 and 48; benchmarks/fleet_sim.py). A whole burst of robots ticking together goes as one
  batch also when that batch ends late but within their tick: split, the device would still be busy when
  the next burst comes, that burst would start late and be split too, and so on (in the simulation, 8
  robots in step settled into batches of 4 that finished at 48 of every 50 ms).

Robots whose ticks fall together (a shared clock, cameras triggered together) arrive in bursts: arrivals
each within GATHER_S of the one before, over no more than GATHER_LIMIT_S. The robots tick together when
the typical arrival's burst in the last second holds at least two robots and half of those seen. Spread
robots do not, even where jitter chains two or three of them; nor does a dense stream of many spread
robots (a chain longer than GATHER_LIMIT_S counts as bursts of one). Where they do, a batch waits for the
robots due in its tick (`_rest_of_the_tick`): a robot is due when its next arrival, from its last and its
median interval, falls within GATHER_LIMIT_S of the tick's first arrival, and it has not come yet. It
waits through a gap in the arrivals (a robot's thread that woke late, or one that is always a few
milliseconds late, would split the tick otherwise, and wait for a whole batch), and goes as soon as the
due robots are in; never past GATHER_LIMIT_S after the first of the waiting observations that arrived in
the last GATHER_LIMIT_S (2 * GATHER_LIMIT_S after the oldest), nor past the latest start of the earliest
deadline for a batch of those waiting and those due (a robot always 7 ms late, with 8 robots of 39 ms
and a 50 ms deadline, is past that start and goes in a batch of its own). A spread robot more than
GATHER_LIMIT_S from the fleet's tick waits for nobody, nor does a straggler whose tick went (its
companions are due a period later); a robot that has left costs one tick's wait.
An arrival counts from the start of `submit`: the robots' threads take turns preparing their
observations, which spread a burst by milliseconds. This is the one wait of a server with one frame in
flight (below).

Holding for the keep-up size is first for an executor that takes a batch while another runs (pipelining
`throughput`): there the server would otherwise send each observation as it comes, in batches too small
to keep up. With one frame on the device at a time (`latency`, `decide(may_hold=False)`) the
observations that came while a batch ran are its company, but with spread phases that company is often
one short of the keep-up size's profile: the batch goes with a slot empty, the next robot arrives just
after it and waits for that whole batch and then its own. On the H200 (8 LIBERO-shaped spread robots, a
batch of 4 in 23 ms) that made the worst p99 48.6 ms and 2 chunks late in 9608. So where the robots'
phases are spread (they do not tick together) the server holds for the keep-up size there too, never
past the earliest deadline's latest start and only while another robot is expected by then
(`hold_spread`; simulated with the H200's device times, the
worst p99 fell from 47.5 to 43.8 ms, late chunks from 10 to 0 and batches of 3 from 490 a minute to none;
on the H200 from 47.7 to 43.0-43.7 ms, docs/many_robots.md). Robots in step are
gathered by their tick and not held for company: a straggler held for company would still hold the
device when the next tick comes.

A batch's device time is its completion minus the moment the device could start it (its issue, or the
previous batch's completion when that is later), the median of the last `window` batches of its profile:
the odd batch that captured a new shape does not move it. A profile not yet seen is estimated from the
smallest larger one seen (a smaller batch costs no more), else linearly from the largest seen (a batch
costs less than linear: the estimate errs high, so the latest start comes early). Until a larger batch
has run, then, the keep-up size is 1 or the largest batch; it settles as the larger profiles are met.
None seen, nothing is held.

Pure Python with no clock of its own: the server feeds it times, the tests a fake clock.
"""

from __future__ import annotations

import itertools
import statistics
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

RATE_WINDOW_S = 1.0  # the arrival rate: observations in the last second
WINDOW = 32  # device times kept per batch profile
MARGIN = 0.1  # of the deadline: a held batch is sent this early, for the spread of the device time
# Robots on one clock submit within about this of each other: their wake-ups, and their observations'
# preparation, which the threads of one process take turns at. Measured in the simulation (8 robots in
# step on a 2-core host): gaps in a tick's arrivals reached 3-8 ms at the 99th percentile; at 2 ms, 7% of
# the ticks split, their stragglers waited for a whole batch of 8 and missed.
GATHER_S = 0.005
# A tick's rest is waited for no longer than this from its first arrival, and a robot is due in a tick
# when its next arrival is expected within this of the tick's start. 8 robots in step on the H200 arrived
# within 5-7 ms at the 99th percentile of their ticks, 10 ms at most (benchmarks/in_step_probe.py).
GATHER_LIMIT_S = 2 * GATHER_S


@dataclass
class Burst:
    """Arrivals each within GATHER_S of the one before: robots that ticked together."""

    start: float
    end: float
    robots: set[str]


class BatchHold:
    """The server's batching decisions: how many of the waiting observations go in the next batch, and
    how long they wait for company first. `enabled` False: all of them (up to `max_batch`), at once."""

    # held: batches sent after waiting (for company or a burst's rest); gathered: waits for a burst
    COUNTERS = ("held", "gathered")

    def __init__(
        self,
        profile_of: Callable[[int], int],
        max_batch: int,
        margin_s: float,
        enabled: bool = True,
        window: int = WINDOW,
        weigh_misses: bool = False,
        hold_spread: bool = True,
    ):
        self.profile_of, self.max_batch, self.margin_s = profile_of, max_batch, margin_s
        self.enabled = enabled
        self.hold_spread = hold_spread  # spread robots held for company one frame at a time too (above)
        self.weigh_misses = weigh_misses  # see _fewer_late_by_waiting (an experiment, off by default)
        self._arrivals: deque[tuple[float, str]] = deque()  # (when, robot), the last RATE_WINDOW_S
        self._device_s: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._median_s: dict[int, float] = {}  # per profile, kept with _device_s
        self._in_flight = 0
        self._last_done = float("-inf")
        self._busy_until = float("-inf")  # when the device should be done with what it was given
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    def arrived(self, robot: str, at: float) -> None:
        """`robot` submitted an observation at `at` (seconds, the server's monotonic clock)."""
        with self._lock:
            self._arrivals.append((at, robot))
            self._forget_before(at - RATE_WINDOW_S)

    def issued(self, size: int, at: float) -> None:
        """A batch of `size` went to the executor at `at`."""
        with self._lock:
            self._in_flight += 1
            expected = self._estimate(size)
            if expected is not None:
                self._busy_until = max(at, self._busy_until) + expected

    def served(self, size: int, issued: float, done: float, computed: bool = True) -> None:
        """A batch of `size` issued at `issued` ended at `done`; `computed`: with chunks (a dropped or
        failed one's time is not a device time, nor the end of one)."""
        with self._lock:
            if computed:
                profile = self.profile_of(size)
                self._device_s[profile].append(done - max(issued, self._last_done))
                self._median_s[profile] = statistics.median(self._device_s[profile])
                self._last_done = max(self._last_done, done)
            self._in_flight -= 1
            if self._in_flight == 0:  # nothing left on the device: free now, whatever was expected
                self._busy_until = done

    def decide(
        self,
        waiting: int,
        earliest_deadline: float,
        now: float,
        may_hold: bool = True,
        arrivals: list[float] | None = None,
        robots: Collection[str] = (),
    ) -> tuple[int, float]:
        """Of `waiting` observations (the earliest due at `earliest_deadline`; `arrivals`: when each
        arrived, from the start of its `submit`): how many the next batch takes, and how long to hold them
        first (0: send now). Not `may_hold` (one frame on the device at a time): no holding for the
        keep-up size unless the robots' phases are spread (`hold_spread`), and then only while a robot
        not among the waiting `robots` is expected before the latest start (`_coming`); a tick still
        arriving is gathered all the same."""
        if not self.enabled:
            return min(waiting, self.max_batch), 0.0
        with self._lock:
            self._forget_before(now - RATE_WINDOW_S)
            bursts = self._bursts()
            gather = self._rest_of_the_tick(bursts, waiting, earliest_deadline, now, arrivals)
            if gather > 0:
                self.counters["gathered"] += 1
                return min(waiting, self.max_batch), gather
            keep_up = self._keep_up_size()
            limit = self.max_batch if keep_up == 1 else min(self.max_batch, self.profile_of(keep_up))
            take = min(waiting, limit)
            everyone = min(waiting, self.max_batch)
            ticking_together = self._burst_waits(bursts, waiting)
            if take < everyone and (ticking_together or self._every_robot_waits(waiting)):
                # capped, but one batch of them all ends before the earliest deadline: not split. Nor is a
                # burst that one batch serves within the robots' tick, though late: split, it would keep
                # the device into the next tick, and every tick after would start late.
                expected = self._estimate(everyone)
                start = max(now, self._busy_until)
                if expected is not None and (
                    start + expected <= earliest_deadline - self.margin_s
                    or (ticking_together and expected <= self._tick_s())
                ):
                    return everyone, 0.0
            spread = self.hold_spread and bool(bursts) and not self._ticking_together(bursts)
            if take >= keep_up or not (may_hold or spread):
                return take, 0.0
            # One frame at a time, the batch the hold may end with is the largest it may take: spread
            # company comes one by one, but two that come together would make a batch end past the
            # latest start of one more. (Where a batch goes while another runs, the hold as measured:
            # one more; the next frame takes who else came.)
            expected = self._estimate(take + 1 if may_hold else limit)
            if expected is None:
                return take, 0.0
            latest_start = earliest_deadline - self.margin_s - expected
            if self._busy_until > latest_start:
                return take, 0.0
            if not may_hold and not self._coming(now, latest_start, set(robots)):
                return take, 0.0  # one frame at a time: held only for company that is on its way
            return take, max(0.0, latest_start - now)

    def count_held(self) -> None:
        """A batch was sent after waiting (for company, or for the rest of a burst)."""
        with self._lock:
            self.counters["held"] += 1

    def device_ms(self) -> dict[str, float]:
        """Per batch profile seen: its median device time (ms)."""
        with self._lock:
            return {str(p): s * 1e3 for p, s in sorted(self._median_s.items())}

    def keep_up_size(self, now: float) -> int:
        with self._lock:
            self._forget_before(now - RATE_WINDOW_S)
            return self._keep_up_size()

    def _bursts(self) -> list[Burst]:
        """The arrivals of the last second grouped into bursts (each arrival within GATHER_S of the one
        before), oldest first. Robots with spread phases make bursts of one; a dense stream (many robots,
        or one at a high rate) makes one long burst."""
        bursts: list[Burst] = []
        for at, robot in sorted(self._arrivals):
            if bursts and at - bursts[-1].end < GATHER_S:
                bursts[-1].end = at
                bursts[-1].robots.add(robot)
            else:
                bursts.append(Burst(at, at, {robot}))
        return bursts

    def _rest_of_the_tick(
        self,
        bursts: list[Burst],
        waiting: int,
        earliest_deadline: float,
        now: float,
        arrivals: list[float] | None = None,
    ) -> float:
        """How long to wait for the rest of a tick (0: none). Robots that tick together arrive in bursts;
        a batch sent before the tick is in leaves the rest to wait behind it, past their deadline. So,
        where the robots tick together, while a robot is due (`_due`) in the tick of the waiting
        observations that arrived in the last GATHER_LIMIT_S (`arrivals`: the waiting observations'
        arrival times; None or empty: the newest burst's start), the batch waits for it; the server
        wakes it at each arrival. A gap in the arrivals does not end the wait (on the H200 a tick's
        largest gap passed GATHER_S in 1 to 3 ticks of 242, benchmarks/in_step_probe.py). It ends
        GATHER_LIMIT_S after the first of those observations, 2 * GATHER_LIMIT_S after the oldest waiting
        one (the tick's start moves as its first observations age), and at the latest start of the
        earliest deadline for a batch of those waiting and those due."""
        if not bursts or self._every_robot_waits(waiting) or not self._ticking_together(bursts):
            return 0.0  # (every robot seen waits, or a full batch: nobody to wait for)
        arrivals = arrivals or [bursts[-1].start]
        recent = [at for at in arrivals if at >= now - GATHER_LIMIT_S]
        due = self._due(min(recent)) if recent else set()
        if not due:
            return 0.0
        expected = self._estimate(min(waiting + len(due), self.max_batch)) or 0.0
        latest_start = earliest_deadline - self.margin_s - expected
        gathered = min(min(recent) + GATHER_LIMIT_S, min(arrivals) + 2 * GATHER_LIMIT_S)
        until = min(gathered, latest_start)
        if self.weigh_misses and latest_start < gathered:
            if self._fewer_late_by_waiting(arrivals, len(due), earliest_deadline, now, gathered):
                until = gathered
        return max(0.0, until - now)

    def _fewer_late_by_waiting(
        self, arrivals: list[float], due: int, earliest_deadline: float, now: float, gathered: float
    ) -> bool:
        """With `weigh_misses`, where the earliest deadline's latest start would end a tick's gather
        before its `due` robots come: whether waiting for them until `gathered` makes fewer chunks late
        (by the measured device times) than sending the waiting ones now and the due ones after. Seen on
        the H200: a robot whose `submit` began 9.5-18 ms before the others' (their threads stopped) set a
        latest start already past; the 4 present went and 10 chunks were late, where waiting about 2 ms
        for all 8 would, by the device times, have made only that robot's late. Each deadline is taken as
        its arrival plus the earliest's span (the server's one deadline); a due robot's as now's, which
        favours sending, as before."""
        span = earliest_deadline - min(arrivals)
        start = max(now, self._busy_until)
        waiting = len(arrivals)
        first = self._estimate(min(waiting, self.max_batch))
        rest = self._estimate(min(due, self.max_batch))
        together = self._estimate(min(waiting + due, self.max_batch))
        if first is None or rest is None or together is None:
            return False
        sent_end, rest_end = start + first, start + first + rest
        late_sending = sum(at + span < sent_end for at in arrivals) + due * (rest_end > now + span)
        waited_end = max(gathered, self._busy_until) + together
        late_waiting = sum(at + span < waited_end for at in arrivals) + due * (waited_end > now + span)
        return late_waiting < late_sending

    def _due(self, tick_start: float) -> set[str]:
        """The robots due in the tick that began at `tick_start` and not come in it: each robot's next
        arrival, its last plus its median interval over the last second, falls within GATHER_LIMIT_S of
        the tick's start, and its last arrival came before it. A robot that came and was served earlier in
        the tick is due a period later; one that has left is due once more, then overdue (a tick's wait)."""
        times: dict[str, list[float]] = defaultdict(list)
        for at, robot in self._arrivals:
            times[robot].append(at)
        due = set()
        for robot, ts in times.items():
            ts.sort()  # registered when prepared, stamped at the start of `submit`: nearly in order
            if len(ts) < 2 or ts[-1] >= tick_start:
                continue
            # median_low: a robot that resubmits within a tick (intervals 5, 95, 5, ...) has no 50 ms period
            interval = statistics.median_low([b - a for a, b in itertools.pairwise(ts)])
            if abs(ts[-1] + interval - tick_start) <= GATHER_LIMIT_S:
                due.add(robot)
        return due

    def _coming(self, now: float, until: float, waiting: set[str]) -> bool:
        """A robot not among the `waiting` is expected by `until`: its next arrival, its last plus its
        median interval over the last second, falls between GATHER_LIMIT_S ago (a robot that left, or
        pauses for an episode's reset, is overdue and expected no more) and `until`."""
        times: dict[str, list[float]] = defaultdict(list)
        for at, robot in self._arrivals:
            if robot not in waiting:
                times[robot].append(at)
        for ts in times.values():
            if len(ts) < 2:
                continue
            ts.sort()
            next_arrival = ts[-1] + statistics.median_low([b - a for a, b in itertools.pairwise(ts)])
            if now - GATHER_LIMIT_S <= next_arrival <= until:
                return True
        return False

    @staticmethod
    def _typical_burst(bursts: list[Burst]) -> int:
        """The burst size of the typical arrival before the newest burst: neither a burst split by a late
        robot nor two spread robots that happened to come close set it. A chain of arrivals longer than
        GATHER_LIMIT_S is a dense stream (many spread robots), not robots ticking together: its arrivals
        count as bursts of one. 1 with nothing before."""
        sizes = [
            len(b.robots) if b.end - b.start <= GATHER_LIMIT_S else 1 for b in bursts[:-1] for _ in b.robots
        ]
        return statistics.median_low(sizes) if sizes else 1

    def _ticking_together(self, bursts: list[Burst]) -> bool:
        """The robots tick together: the typical burst holds at least two robots and at least half of the
        robots seen. Spread robots, even with jitter chaining a few of them, make bursts far smaller than
        the fleet; a dense stream is one burst with none before it."""
        typical = self._typical_burst(bursts)
        return typical >= 2 and 2 * typical >= len({robot for _, robot in self._arrivals})

    def _every_robot_waits(self, waiting: int) -> bool:
        """Every robot seen in the last second waits: nobody else is due before the next tick."""
        return waiting >= min(len({robot for _, robot in self._arrivals}), self.max_batch)

    def _burst_waits(self, bursts: list[Burst], waiting: int) -> bool:
        """The robots tick together and what waits holds the whole newest tick (at least two robots)."""
        if not bursts or not self._ticking_together(bursts):
            return False
        robots = self._newest_tick(bursts)
        return len(robots) >= 2 and waiting >= len(robots)

    @staticmethod
    def _newest_tick(bursts: list[Burst]) -> set[str]:
        """The robots of the newest burst and of the bursts just before it that began within GATHER_LIMIT_S
        of it: one tick, though a robot more than GATHER_S behind the others began a burst of its own (on
        the H200 a tick's last robot came 5-7 ms after the rest, and its batch was split 4 + 4 as if
        the others were another tick's)."""
        robots = set(bursts[-1].robots)
        for burst in reversed(bursts[:-1]):
            if bursts[-1].start - burst.start > GATHER_LIMIT_S:
                break
            robots |= burst.robots
        return robots

    def _tick_s(self) -> float:
        """The time between one robot's observations, over the last second (robots / arrival rate)."""
        robots = len({robot for _, robot in self._arrivals})
        return robots * RATE_WINDOW_S / max(1, len(self._arrivals))

    def _keep_up_size(self) -> int:
        rate = len(self._arrivals) / RATE_WINDOW_S
        robots = len({robot for _, robot in self._arrivals})
        if rate == 0:
            return 1
        for n in range(1, min(self.max_batch, robots) + 1):
            expected = self._estimate(n)
            if expected is None:
                return 1  # nothing measured yet: send at once (and measure)
            if expected <= n / rate:
                return n
        return min(self.max_batch, robots)  # overloaded: the fullest batch the robots can make

    def _estimate(self, n: int) -> float | None:
        if not self._median_s:
            return None
        profile = self.profile_of(n)
        larger = [p for p in self._median_s if p >= profile]
        if larger:
            return self._median_s[min(larger)]
        largest = max(self._median_s)
        return self._median_s[largest] * profile / largest

    def _forget_before(self, t: float) -> None:
        while self._arrivals and self._arrivals[0][0] < t:
            self._arrivals.popleft()
