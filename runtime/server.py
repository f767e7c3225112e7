"""A policy server for several robots: each submits its observations, one executor computes them in
batches (one copy of the weights).

    server = PolicyServer(executor)                  # an executor with max_batch > 1
    future = server.submit("arm_1", obs)             # -> Future[ActionChunk]; newest wins per robot
    server.figures()                                 # per robot: counters, latency, misses

Batching: a batcher thread waits until the executor can take a frame (its last one is on the device),
then takes the pending observations of up to `max_batch` robots, earliest deadline first, and submits
them as one frame. At light load it sends them at once; under load it takes no more than keeps up with
the robots' rate, and, where the executor takes a frame while another runs or (one frame at a time) the
robots' phases are spread and another robot is on its way, it may hold them for company until there are
enough to keep up (never past the latest start of the earliest deadline; runtime/batching.py;
`hold=False`: always at once, up to `max_batch`). With more robots pending than a
batch takes, the later deadlines wait for the next frame; as every robot's deadline comes due in turn,
none is starved.

Steps: a robot may ask for fewer denoising steps (its node's adaptive steps under deadline pressure); a
batch runs at the fewest its members asked for, so the robot under most pressure decides for the robots
it shares the GPU with (they share the pressure too). Every chunk says the steps it was made with.

Each robot's input is checked when it is submitted (ValueError naming the field, to that robot only);
a newer observation of the same robot replaces its pending one (FrameDropped for the older). Latency is
submit -> chunk, a miss a chunk that came after its observation's deadline (default: submit + 50 ms).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .batching import MARGIN, BatchHold
from .config import NOISE_STREAM
from .executor import ExecutorClosed, Member, PipelinedExecutor, resolve
from .handover import PreviousChunk
from .policy import FrameDropped
from .scheduler import DEFAULT_DEADLINE_S
from .timing import LatencyStats
from .types import Observation

ROBOT_COUNTERS = ("submitted", "replaced", "completed", "failed", "misses")


@dataclass
class Pending:
    robot: str
    # Released once the executor has it: the member's future calls back into this Pending, and a Pending
    # that kept its member would close a reference cycle (member -> future -> callback -> Pending ->
    # member) that only the cyclic collector frees, images and all: on the H200 every observation's went
    # to it, and its collections came 4 times as often (docs/many_robots.md).
    member: Member | None
    future: Future  # the robot's: resolved from the member's
    deadline: float  # monotonic
    submitted: float  # monotonic
    steps: int | None = None  # denoising steps asked for (None: the configured ones)


class PolicyServer:
    def __init__(
        self,
        executor: PipelinedExecutor,
        deadline_s: float = DEFAULT_DEADLINE_S,
        hold: bool = True,
        weigh_misses: bool = False,
        hold_spread: bool = True,
    ):
        """`hold`: batches held for company and capped (runtime/batching.py), else sent at once;
        `weigh_misses`: a tick's gather may outlast its first robot's latest start where that makes fewer
        chunks late (BatchHold._fewer_late_by_waiting; an experiment until measured on a GPU);
        `hold_spread`: with one frame on the device at a time, spread robots' batches are held for
        company too (BatchHold; false for the comparison in fleet_bench and fleet_sim)."""
        if not deadline_s > 0:
            raise ValueError(f"deadline_s: must be positive, got {deadline_s}")
        self.executor, self.deadline_s = executor, deadline_s
        self.max_batch = executor.config.max_batch
        # the executor says which profile a batch runs in (its device time is that profile's)
        self.batching = BatchHold(
            executor.batch_profile,
            self.max_batch,
            MARGIN * deadline_s,
            enabled=hold,
            weigh_misses=weigh_misses,
            hold_spread=hold_spread,
        )
        self._pending: dict[str, Pending] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.counters: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(ROBOT_COUNTERS, 0))
        self.latency = LatencyStats()  # per robot, submit -> chunk (ms)
        self.batches: list[list[str]] = []  # the robots of each frame, in submission order (last 1000)
        self._batch_sizes: Counter[int] = Counter()  # batches sent per size, since the start (batch_sizes())
        self._noise: dict[str, np.random.Generator] = {}  # per robot: a run repeats whatever the timing
        self._batcher = threading.Thread(target=self._batch_loop, name="vla-batcher", daemon=True)
        self._batcher.start()

    def submit(
        self,
        robot: str,
        obs: Observation,
        previous: PreviousChunk | None = None,
        deadline_s: float | None = None,
        noise=None,
        steps: int | None = None,
    ) -> Future:
        """Queue a robot's observation; its deadline is `deadline_s` (default the server's) from now. A
        replaced observation's deadline stays (the robot has waited since then: a robot that submits often
        must not fall behind in the deadline order). `steps`: the denoising steps it asks for at most."""
        deadline_s = self.deadline_s if deadline_s is None else deadline_s
        if not deadline_s > 0:
            raise ValueError(f"deadline_s: must be positive, got {deadline_s}")
        self.executor.check_steps(steps)
        # The robot's wait starts here: its deadline and its arrival (for the bursts of robots ticking
        # together) count from now, not from when its preparation ends; robots' threads take turns at that.
        now = time.monotonic()
        # bad input: ValueError, to this robot (and no draw from its noise: its sequence stays the same)
        member = self.executor.prepare(obs, noise, previous, draw_noise=lambda: self._noise_for(robot))
        pending = Pending(robot, member, Future(), now + deadline_s, now, steps)
        with self._cond:
            if self._closed:
                raise ExecutorClosed("server is closed")
            replaced = self._pending.get(robot)
            if replaced is not None:
                pending.deadline = min(pending.deadline, replaced.deadline)
            self._pending[robot] = pending
            self.counters[robot]["submitted"] += 1
            self.counters[robot]["replaced"] += replaced is not None
            self.batching.arrived(robot, now)
            self._cond.notify_all()
        if replaced is not None:  # (a robot may have cancelled its wait for it)
            resolve(replaced.future, error=FrameDropped(f"{robot}: replaced by a newer observation"))
        return pending.future

    def _noise_for(self, robot: str) -> np.ndarray:
        """The robot's next denoising noise, from a generator of its own seeded by the configuration's
        seed and its name: with several robots on threads, each robot's sequence does not depend on the
        order in which the threads come."""
        cfg = self.executor.config
        with self._cond:
            if robot not in self._noise:
                self._noise[robot] = np.random.default_rng(
                    [cfg.seed, NOISE_STREAM, zlib.crc32(robot.encode())]
                )
            return self._noise[robot].standard_normal(
                (cfg.model.action_horizon, cfg.model.action_dim), dtype=np.float32
            )

    def _batch_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._pending)
                if self._closed:
                    return
            try:
                if not self.executor.wait_for_room(timeout=1.0):
                    continue  # still busy
            except ExecutorClosed as err:  # the executor was closed under the server: nobody waits forever
                self._stop(err)
                return
            ready = self._take_batch()
            if not ready:
                continue
            self.batches.append([p.robot for p in ready])
            del self.batches[:-1000]
            asked = [p.steps for p in ready if p.steps is not None]
            issued = time.monotonic()
            try:
                futures = self.executor.submit_prepared([p.member for p in ready], min(asked, default=None))
            except Exception as err:  # noqa: BLE001 - closed meanwhile: the robots hear of it
                for p in ready:
                    self._finish(p, error=err)
                continue
            self.batching.issued(len(ready), issued)
            with self._cond:
                self._batch_sizes[len(ready)] += 1
            futures[0].add_done_callback(self._batch_served(len(ready), issued))  # a frame resolves at once
            for p, f in zip(ready, futures, strict=True):
                p.member = None  # the executor has it (see Pending.member)
                f.add_done_callback(lambda f, p=p: self._finish(p, future=f))

    def _batch_served(self, size: int, issued: float):
        def served(frame: Future) -> None:
            self.batching.served(size, issued, time.monotonic(), computed=frame.exception() is None)
            with self._cond:  # a held batch decides again with what was just measured
                self._cond.notify_all()

        return served

    def _take_batch(self) -> list[Pending]:
        """Up to `max_batch` pending observations (under load, up to the keep-up size's profile), earliest
        deadline first, once the hold lets them go (a new observation re-decides); none when the server
        closed meanwhile."""
        held = False
        with self._cond:
            while not self._closed and self._pending:
                by_deadline = sorted(self._pending.values(), key=lambda p: p.deadline)
                # holding for the keep-up size where a batch goes while another runs, or the robots' phases
                # are spread (BatchHold.decide); a burst's rest is gathered either way
                may_hold = self.executor.batching_in_flight() > 1
                take, wait = self.batching.decide(
                    len(by_deadline),
                    by_deadline[0].deadline,
                    time.monotonic(),
                    may_hold,
                    [p.submitted for p in by_deadline],
                    [p.robot for p in by_deadline],
                )
                if wait <= 0:
                    ready = by_deadline[:take]
                    for p in ready:
                        del self._pending[p.robot]
                    if held:
                        self.batching.count_held()
                    return ready
                held = True
                self._cond.wait(wait)
        return []

    def _finish(self, p: Pending, future: Future | None = None, error: BaseException | None = None) -> None:
        error = error if future is None else future.exception()
        done = time.monotonic()
        with self._cond:
            counters = self.counters[p.robot]
            if error is not None:
                counters["failed"] += 1
            else:
                counters["completed"] += 1
                counters["misses"] += done > p.deadline
        if error is not None:
            resolve(p.future, error=error)
            return
        self.latency.add(p.robot, (done - p.submitted) * 1e3)
        resolve(p.future, result=future.result())

    def batch_sizes(self) -> Counter[int]:
        """Batches sent to the executor per size, since the start (a copy)."""
        with self._cond:
            return Counter(self._batch_sizes)

    def figures(self) -> dict[str, dict]:
        """Per robot: counters and submit -> chunk latency (p50 / p99, ms)."""
        latency = self.latency.summary()
        with self._cond:
            return {
                robot: {
                    **counters,
                    "latency_p50_ms": latency.get(robot, {}).get("p50"),
                    "latency_p99_ms": latency.get(robot, {}).get("p99"),
                }
                for robot, counters in self.counters.items()
            }

    def session(self, robot: str) -> RobotSession:
        """The server as one robot sees it: a policy-like `submit` and `reset` (sim.episode's links use
        it as they use a policy)."""
        return RobotSession(self, robot)

    def _stop(self, error: BaseException) -> None:
        """No more batching; the pending observations fail with `error`."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
            self._cond.notify_all()
        for p in pending:
            resolve(p.future, error=error)

    def close(self) -> None:
        """Stop batching; pending observations fail (the executor is the caller's to close)."""
        self._stop(ExecutorClosed("server closed"))
        if threading.current_thread() is not self._batcher:
            self._batcher.join(5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RobotSession:
    def __init__(self, server: PolicyServer, robot: str):
        self.server, self.robot = server, robot
        self.metadata = server.executor.metadata

    def submit(
        self, obs: Observation, noise=None, steps=None, previous: PreviousChunk | None = None
    ) -> Future:
        return self.server.submit(self.robot, obs, previous=previous, noise=noise, steps=steps)

    def reset(self) -> None:
        """Nothing to reset between episodes: a robot's pending observation is answered or replaced, and its
        counters, latency samples and noise generator carry on (a run of episodes repeats as a whole)."""
