"""One closed-loop LIBERO episode, whichever way the policy is reached.

A `PolicyLink` carries observations to the policy and chunks back: `InProcessLink` calls the policy
interface in this process; the ROS sim bridge (nodes/sim_bridge_node.py) publishes the policy node's
topics. The episode loop below is the same for both.

Modes:
- lockstep (evaluation): the simulator waits for the policy. Each observation is stamped with the
  simulation clock (the ROS link publishes it on /clock, and the node runs on it), so a chunk is aligned
  to its observation exactly; actions [0:replan_steps] of it are executed, then the next observation
  goes out (openpi's LIBERO example).
- wall_clock: the simulator steps at its own pace, at most one step per control period of real time,
  while the policy computes concurrently; every step offers the newest observation, and executes the
  action due now of the newest chunk (by its stamp); when none is fresh, the current chunk's tail runs.

Hand-over: with each observation goes the current chunk's remaining actions (a `PreviousChunk`; in wall
clock with the delay the chunk scheduler expects from the measured ages); the in-process link gives it to
the policy, the policy node builds its own from its scheduler. `delay_steps` (lockstep) injects an
inference delay: the simulator executes that many more actions of the old chunk after the observation,
as a robot would while the new chunk is computed, and the new chunk takes over from its action
`delay_steps` on. Every hand-over's splice jump (the distance between the last action executed from the
old chunk and the first from the new) is recorded beside the step sizes within a chunk.

Latency and misses have one definition (runtime.scheduler): the age of a chunk is the wall-clock time
from its observation to its arrival here; a miss is an observation whose deadline passed before a chunk
for it (or a newer one) arrived. In lockstep the simulator waits, so a miss costs the episode nothing,
but it is what a robot would have suffered.
"""

from __future__ import annotations

import abc
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.config import NOISE_STREAM
from ..runtime.handover import PreviousChunk
from ..runtime.policy import FrameDropped, Policy
from ..runtime.scheduler import DEFAULT_DEADLINE_S, ChunkScheduler
from ..runtime.types import ActionChunk, Observation
from .mapping import to_libero_action, to_observation
from .report import EpisodeResult, save_gif

# LIBERO's per-suite step limits (openpi's LIBERO example: the longest training demo plus margin).
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
CONTROL_PERIOD_S = 0.05  # LIBERO's control rate: 20 Hz
SIM_CLOCK_START_S = 1000.0  # the simulation clock starts here and only moves forward
REOFFER_S = 1.0  # an observation not answered within this is offered again


def stamp_key(seconds: float) -> int:
    """Stamps compared in microseconds: a stamp that went through a ROS message (sec, nanosec) comes back
    as a float that may differ in its last bits."""
    return round(seconds * 1e6)


@dataclass(frozen=True)
class ReceivedChunk:
    stamp: float  # the observation it answers, on the episode clock
    first_index: int  # which action of the policy's chunk actions[0] is (the node cuts passed ones)
    actions: np.ndarray  # [n, dof]
    age_ms: float  # wall clock: observation offered -> chunk arrived here
    engine_ms: dict[str, float] = field(default_factory=dict)  # the engine's own timings, where known

    def action_at(self, index: int) -> np.ndarray | None:
        """The policy's action `index` (0 = the one due at the observation's time), if this chunk has it."""
        row = index - self.first_index
        return self.actions[row] if 0 <= row < len(self.actions) else None


class PolicyLink(abc.ABC):
    """How the episode reaches the policy. The clock: in lockstep a simulation clock advanced by the loop,
    else the wall clock (ROS system time)."""

    path = ""  # "in-process" | "ros"
    lossy = False  # observations can be lost on the way (ROS best-effort images): offered again

    def __init__(self, lockstep: bool):
        self.lockstep = lockstep
        self._sim_time = SIM_CLOCK_START_S
        self._offered: dict[int, float] = {}  # observation stamp key -> perf_counter when first offered
        self._answered: set[int] = set()  # stamp keys already answered: a repeat is a tail, not a chunk
        self._chunks: list[ReceivedChunk] = []
        self._error: BaseException | None = None  # the policy failed: raised to the episode loop
        self._cond = threading.Condition()

    def now(self) -> float:
        return self._sim_time if self.lockstep else time.time()

    def advance(self, seconds: float) -> None:
        """Lockstep: the simulation clock moves by one step."""
        self._sim_time += seconds

    def offer(self, obs: Observation, previous: PreviousChunk | None = None) -> None:
        """Send an observation (stamped on this link's clock) and what the robot still executes from its
        current chunk; returns at once."""
        with self._cond:
            # a re-offered observation keeps its first time: the age includes what was lost
            self._offered.setdefault(stamp_key(obs.timestamp), time.perf_counter())
            if len(self._offered) > 1000:
                self._offered.pop(next(iter(self._offered)))
        self._send(obs, previous)

    @abc.abstractmethod
    def _send(self, obs: Observation, previous: PreviousChunk | None) -> None: ...

    def _received(self, stamp: float, first_index: int, actions: np.ndarray, engine_ms=None) -> None:
        """A chunk arrived (any thread)."""
        with self._cond:
            key = stamp_key(stamp)
            offered = self._offered.get(key)
            if offered is None or key in self._answered:
                return  # not an observation of this episode, or a tail of a chunk already here
            self._answered.add(key)
            age_ms = (time.perf_counter() - offered) * 1e3
            self._chunks.append(ReceivedChunk(stamp, first_index, actions, age_ms, engine_ms or {}))
            del self._chunks[:-50]
            self._cond.notify_all()

    def chunk_for(self, stamp: float, timeout_s: float) -> ReceivedChunk | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise RuntimeError(f"the policy failed: {error}") from error
                for chunk in self._chunks:
                    if stamp_key(chunk.stamp) == stamp_key(stamp):
                        return chunk
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def received(self) -> list[ReceivedChunk]:
        """The chunks of this episode not yet taken (the last 50)."""
        with self._cond:
            return list(self._chunks)

    def take_new(self) -> list[ReceivedChunk]:
        """Chunks that arrived since the last call, oldest first."""
        with self._cond:
            new, self._chunks = self._chunks, []
            return new

    def start_episode(self, key: tuple[int, ...] = ()) -> None:
        """A new episode; `key` names it (run's seed, suite, task, init state) for links that draw its
        noise."""
        with self._cond:
            self._chunks.clear()
            self._offered.clear()
            self._answered.clear()

    def diagnostics(self) -> dict:
        """The policy's own figures (engine latency), for the report."""
        return {}


class InProcessLink(PolicyLink):
    path = "in-process"

    def __init__(self, policy: Policy, lockstep: bool = True, recorder=None, noise_shape=None):
        """`noise_shape`: the policy's denoising noise (default: its metadata's). Each episode's noise is
        drawn here from a generator seeded by the episode's key, so an episode gets the same noise
        whichever worker, server or path runs it, and whatever ran before it."""
        super().__init__(lockstep)
        self.policy, self.recorder = policy, recorder
        self.noise_shape = tuple(noise_shape if noise_shape is not None else policy.metadata.noise_shape)
        self._noise: np.random.Generator | None = None
        self._outstanding = 0  # submitted in this episode, not answered
        self._episode = 0  # a request of an earlier episode, answered late, counts for nothing

    def _send(self, obs: Observation, previous: PreviousChunk | None) -> None:
        with self._cond:
            if previous is not None and self._outstanding:
                # joined to the chunk in flight instead, once it is here: the loop offers a newer
                # observation at its next step (real-time chunking's loop, as the policy node's)
                return
            self._outstanding += 1
            episode = self._episode
            noise = None if self._noise is None else self._noise.standard_normal(self.noise_shape, np.float32)
        if self.recorder is not None:
            self.recorder.write(obs)  # runtime.recording.ObservationRecorder: for `vla-runtime calibrate`
        future = self.policy.submit(obs, noise=noise, previous=previous)
        future.add_done_callback(lambda f: self._done(f, episode))

    def _done(self, future, episode: int) -> None:
        with self._cond:
            if episode != self._episode:
                return  # an earlier episode's
            self._outstanding -= 1
        error = future.exception()
        if isinstance(error, FrameDropped):
            return  # a newer observation replaced it (wall-clock mode); counted by the policy
        if error is not None:
            with self._cond:
                self._error = error
                self._cond.notify_all()
            return
        chunk = future.result()
        engine = {k: v for k, v in chunk.timings_ms.items() if k in ("vision", "prefix", "denoise", "total")}
        self._received(chunk.timestamp, 0, chunk.actions, engine)

    def start_episode(self, key: tuple[int, ...] = ()) -> None:
        self.policy.reset()
        self._noise = np.random.default_rng(key) if key and self.noise_shape else None
        super().start_episode(key)
        with self._cond:
            self._outstanding = 0
            self._episode += 1


def run_episode(
    client,
    link: PolicyLink,
    suite: str,
    task: int,
    init_state: int = 0,
    *,
    max_steps: int | None = None,
    replan_steps: int = 5,
    delay_steps: int = 0,
    seed: int = 7,
    settle_steps: int = 10,
    deadline_s: float = DEFAULT_DEADLINE_S,
    chunk_timeout_s: float = 120.0,
    video_dir: Path | None = None,
    progress=None,
) -> EpisodeResult:
    """One episode of `suite` task `task` from init state `init_state`; `progress(result)` after each step."""
    if replan_steps < 1:
        raise ValueError(f"replan_steps: must be at least 1, got {replan_steps}")
    if delay_steps < 0 or (delay_steps and not link.lockstep):
        raise ValueError(f"delay_steps: a non-negative delay, injected in lockstep only; got {delay_steps}")
    started = time.monotonic()
    sim_obs = client.reset(suite, task, init_state, seed, settle_steps)
    mode = "lockstep" if link.lockstep else "wall-clock"
    result = EpisodeResult(suite, task, init_state, sim_obs["instruction"], f"{link.path} {mode}")
    result.reset_ms = (time.monotonic() - started) * 1e3
    limit = max_steps or MAX_STEPS.get(suite, 300)
    deadlines = ChunkScheduler(CONTROL_PERIOD_S, deadline_s)  # the one definition of a miss
    frames = [sim_obs["agentview"]] if video_dir is not None else []
    # the episode's noise follows from the run's seed and the episode alone (InProcessLink)
    link.start_episode((seed, NOISE_STREAM, zlib.crc32(suite.encode()), task, init_state))

    last_action: list[np.ndarray] = []  # the action executed last, and whether a hand-over preceded it

    def step(action: np.ndarray, handed_over: bool = False, observed: bool = True) -> bool:
        """One action; `observed`: its observation is offered to the policy, so the cameras render (a
        video renders every step)."""
        nonlocal sim_obs
        if last_action:
            distance = float(np.linalg.norm(action - last_action[0]))
            (result.splice_jumps if handed_over else result.step_sizes).append(distance)
        last_action[:] = [np.asarray(action, dtype=np.float32)]
        sent = time.monotonic()
        last = result.steps + 1 >= limit  # no observation after the episode's last step
        reply = client.step(to_libero_action(action), render=(observed and not last) or video_dir is not None)
        result.step_ms.append((time.monotonic() - sent) * 1e3)
        if "sim_ms" in reply:  # a server of an earlier version does not say
            result.sim_ms.append(float(reply["sim_ms"]))
        sim_obs = reply["observation"]
        result.steps += 1
        result.success_per_step.append(bool(reply["success"]))
        if video_dir is not None:
            frames.append(sim_obs["agentview"])
        if progress is not None:
            progress(result)
        return bool(reply["success"] or reply["done"]) or result.steps >= limit

    def account(chunk: ReceivedChunk) -> None:
        """Judged at its arrival (stamp + age, both modes), not at whenever the loop looks."""
        result.add_chunk(chunk.age_ms, chunk.engine_ms)
        deadlines.offer(ActionChunk(chunk.actions, chunk.stamp), chunk.stamp + chunk.age_ms * 1e-3)

    done = False
    if link.lockstep:
        current: ReceivedChunk | None = None
        next_index = 0  # of the current chunk: the action due now
        while not done:
            stamp = link.now()
            obs = to_observation(sim_obs, stamp)
            remaining = _remaining(current, next_index)
            link.offer(obs, PreviousChunk(remaining, delay_steps) if remaining is not None else None)
            deadlines.observed(stamp)
            # the injected delay: the old chunk goes on while the new one is computed
            delayed = 0
            while remaining is not None and delayed < min(delay_steps, len(remaining)) and not done:
                link.advance(CONTROL_PERIOD_S)
                done = step(remaining[delayed], observed=False)  # the chunk's own steps follow
                delayed += 1
            if done:
                break
            waiting = time.monotonic()
            chunk = wait_for_chunk(link, obs, chunk_timeout_s, result)
            result.chunk_wait_ms.append((time.monotonic() - waiting) * 1e3)
            account(chunk)  # age on the wall clock: the simulation clock stands still meanwhile
            first = max(delayed, chunk.first_index)
            result.late_actions += max(
                0, chunk.first_index - delayed
            )  # never, when the node runs on sim time
            executable = [i for i in range(first, first + replan_steps) if chunk.action_at(i) is not None]
            if not executable:
                raise RuntimeError(
                    f"a chunk starting at action {chunk.first_index} of {len(chunk.actions)} has none of "
                    f"actions [{first}:{first + replan_steps}] (is the policy node on the simulation clock?)"
                )
            current = chunk
            for n, index in enumerate(executable):
                result.executed_indices.append(index)
                link.advance(CONTROL_PERIOD_S)
                next_index = index + 1
                # only the cycle's last step is observed: the next offer sends its observation
                if done := step(
                    chunk.action_at(index), handed_over=n == 0, observed=n == len(executable) - 1
                ):
                    break
    else:
        obs = to_observation(sim_obs, link.now())
        link.offer(obs)
        waiting = time.monotonic()
        current = wait_for_chunk(
            link, obs, chunk_timeout_s, result, restamp=lambda: to_observation(sim_obs, link.now())
        )
        result.chunk_wait_ms.append((time.monotonic() - waiting) * 1e3)  # the first chunk; later ones overlap
        account(current)
        next_tick = time.monotonic()
        while not done:
            stamp = link.now()
            # the current chunk from now on, and the delay the scheduler expects from the measured ages
            link.offer(to_observation(sim_obs, stamp), deadlines.previous_chunk(stamp))
            deadlines.observed(stamp)
            handed_over = False
            for chunk in sorted(link.take_new(), key=lambda c: c.stamp + c.age_ms):
                if chunk.stamp > current.stamp:
                    current, handed_over = chunk, True
                account(chunk)
            deadlines.check(link.now())
            index = int(np.floor((link.now() - current.stamp) / CONTROL_PERIOD_S + 1e-9))
            action = current.action_at(index)
            if action is None:  # the chunk is exhausted: hold its last action
                action = current.actions[-1]
            done = step(action, handed_over)
            next_tick += CONTROL_PERIOD_S
            wait = next_tick - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                result.sim_overruns += 1  # the simulator cannot keep the real-time rate
                next_tick = time.monotonic()
    figures = deadlines.figures()
    result.deadline_misses = figures["misses"]
    result.exhausted = figures["exhausted"]
    result.success = any(result.success_per_step)
    result.policy_diagnostics = link.diagnostics()
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
        name = f"{suite}_task{task}_init{init_state}_{'success' if result.success else 'failure'}.gif"
        result.video = str(save_gif(frames, video_dir / name))
    result.wall_s = time.monotonic() - started  # the diagnostics' wait and the GIF count as "other"
    return result


def _remaining(chunk: ReceivedChunk | None, next_index: int) -> np.ndarray | None:
    """The chunk's actions from `next_index` on (what the robot would still execute), or None."""
    if chunk is None:
        return None
    rows = [chunk.action_at(i) for i in range(next_index, chunk.first_index + len(chunk.actions))]
    rows = [r for r in rows if r is not None]
    return np.stack(rows).astype(np.float32) if rows else None


def wait_for_chunk(
    link: PolicyLink, obs: Observation, timeout_s: float, result: EpisodeResult, restamp=None
) -> ReceivedChunk:
    """The chunk for `obs`, offered again every second until answered: a node just started may not have
    its subscriptions yet, and camera images travel best effort (a lost one loses the observation).
    Counted in `result.reoffers`; the chunk's age still counts from the first offer. `restamp()` (wall
    clock) makes each new offer a fresh observation: one re-sent with its first stamp would be older
    than the node's max_obs_age_s after a second, and refused as stale for ever."""
    end = time.monotonic() + timeout_s
    while True:
        chunk = link.chunk_for(obs.timestamp, min(REOFFER_S, timeout_s) if link.lossy else timeout_s)
        if chunk is not None:
            return chunk
        if time.monotonic() >= end:
            raise TimeoutError(
                f"no chunk for the observation at {obs.timestamp:.3f} within {timeout_s:.0f} s"
            )
        result.reoffers += 1
        obs = restamp() if restamp is not None else obs
        link.offer(obs)
