"""The multi-stream pipelined executor.

    submit(obs) -> Future[ActionChunk]        returns at once; newest observation wins when full

A dispatcher thread takes the newest pending frame, stages its inputs in pinned host memory and issues,
without waiting on the device:

    h2d stream      pixels | masks+tokens | state+noise
    vision stream   vision graph [slot]
    prefix stream   prefix graph [slot]              -> KV cache [slot]
    denoise stream  k-step denoise graph [slot]      -> actions [slot]
    d2h stream      actions -> pinned host

Frame N uses slot N % 2, so frame N+1 enters vision while frame N is in prefix and frame N-1 in
denoise. Events order everything: each step waits for what runtime/hazards.py derives from its table
of which step reads and writes which slot tensor. Up to MAX_IN_FLIGHT frames are on the device. A
completion thread waits for each frame's last event, reads the device timings and resolves its future.

On a machine without CUDA the same threads, slots and buffers run the stages eagerly, in order, so every
behaviour (ordering, slot reuse, dropping, futures, errors) is exercised by the CPU tests.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
import torch

from .adaptive import steps_ladder
from .buffers import (
    HOST_RING,
    MAX_IN_FLIGHT,
    PIPELINE_SLOTS,
    ShapeProfile,
    StaticBuffers,
    batch_profile,
    batch_sizes,
    prompt_bucket,
)
from .collector import WhileDeviceBusy, executor_closed, executor_started, freeze_long_lived
from .compile_cache import use_compile_cache
from .config import RuntimeConfig
from .handover import HandoverArrays, PreviousChunk
from .hazards import PIPELINE, STEP_NAMES, WAITS, Step
from .inputs import PreparedInputs, place_raw_images
from .loading import PolicyParts, build_parts
from .pipelining import PipeliningChooser
from .policy import FrameDropped, Policy
from .python_bytecode import BYTECODE_HINT, bytecode_kept
from .stages import STAGES, CompiledFunctions, StageEngine, StageRunner
from .timing import LatencyStats, TraceRecorder
from .types import ActionChunk, Observation

log = logging.getLogger(__name__)
CAPTURE_TIMEOUT_S = 900.0  # infer waits this long at most for a frame whose new shape is being captured

# Two events per step of a frame (runtime/hazards.py): its start, recorded once its waits are met, and its
# end; a step's device time is the span between them.
EVENT_NAMES = tuple(f"{name}_{edge}" for name in STEP_NAMES for edge in ("start", "end"))


class ExecutorClosed(RuntimeError):
    pass


class DeviceHung(RuntimeError):
    """A frame stayed on the device past `device_timeout_s`: its future fails, health reports it."""


class DeviceFailed(RuntimeError):
    """The device could not drain after a failure (a sticky CUDA error): the executor serves no more."""


@dataclass
class Member:
    """One observation of a frame: a frame is a batch of them (one robot each), computed together."""

    obs_timestamp: float
    inputs: PreparedInputs
    noise: np.ndarray
    previous: PreviousChunk | None
    handover: HandoverArrays
    future: Future
    received: float = 0.0  # perf_counter when `prepare` took it: the chunk's latency counts from here
    prepare_ms: float = 0.0  # the host's check and preparation (images, prompt, state)

    @property
    def cameras_present(self) -> int:
        return int(self.inputs.image_masks.sum())

    @property
    def prompt_tokens(self) -> int:
        """The prompt length its shape profile must hold (see PreparedInputs.prompt_room; never less than
        its tokens, which a shorter profile would cut)."""
        return max(self.inputs.prompt_room, int(self.inputs.token_masks.sum()))

    def view_order(self, profile: ShapeProfile) -> np.ndarray:
        """The full shape's view shown in each of `profile`'s view slots: the cameras present first when
        the profile has fewer views (the absent ones are masked in the full shape)."""
        masks = self.inputs.image_masks
        return np.arange(len(masks)) if profile.views == len(masks) else np.flatnonzero(masks)

    def raw_views(self, profile: ShapeProfile) -> dict[int, np.ndarray]:
        """resize_on_device: `profile`'s view slot -> the raw image to resize into it on the device."""
        raw = self.inputs.raw_images
        return {
            slot: raw[int(view)] for slot, view in enumerate(self.view_order(profile)) if int(view) in raw
        }

    def arrays(self, profile: ShapeProfile) -> dict[str, np.ndarray]:
        """Its row of each host input tensor (buffers._input_shapes names them), in `profile`'s shape:
        with fewer views, the cameras present move to the first slots (the absent ones are masked in the
        full shape, so their tokens take no position and no attention: the same actions); with a shorter
        prompt, the padding is cut."""
        pixels, masks = self.inputs.pixels, self.inputs.image_masks
        if profile.views != len(masks):
            present = self.view_order(profile)
            pixels = np.zeros((profile.views, *pixels.shape[1:]), dtype=pixels.dtype)
            pixels[: len(present)] = self.inputs.pixels[present]
            masks = np.arange(profile.views) < len(present)
        return {
            "pixels": pixels,
            "image_masks": masks,
            "tokens": self.inputs.tokens[: profile.prompt_len],
            "token_masks": self.inputs.token_masks[: profile.prompt_len],
            "state": self.inputs.state,
            "noise": self.noise,
            "handover": self.handover.packed,
        }


@dataclass
class Frame:
    index: int
    members: list[Member]
    profile: ShapeProfile  # its batch: the smallest batch profile that holds the members
    submitted: float  # perf_counter at submit
    dispatched: float = 0.0
    on_device_since: float | None = None  # monotonic time its device work was issued (the watchdog's clock)
    issue_number: int | None = None  # its place in issue order: slot and host ring entry follow from it
    slot: int = 0
    ring: int = 0
    larger_shape: bool = False  # runs in a captured shape larger than its own (capture_new_shapes false)
    host_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # CPU path: stage -> (start, end)


class PipelinedExecutor(Policy):
    def __init__(
        self,
        config: RuntimeConfig | None = None,
        parts: PolicyParts | None = None,
        use_graphs: bool | None = None,
        profiles: list[ShapeProfile] | None = None,
        engines: dict[str, StageEngine] | None = None,
    ):
        """`engines`: stage name -> what serves it instead of the model's own code (captured in the graphs
        like the default; see stages.StageEngine)."""
        self.parts = parts or build_parts(config or RuntimeConfig())
        self.config = self.parts.config
        self.device = self.parts.device
        self.cuda = self.device.type == "cuda"
        self.use_graphs = self.cuda if use_graphs is None else use_graphs
        if self.use_graphs and not self.cuda:
            raise ValueError("use_graphs: CUDA graphs need a CUDA device")
        self.stats = LatencyStats()
        self.trace = TraceRecorder()
        # larger_shape: frames run in a captured shape larger than their own (capture_new_shapes false)
        self.counters = dict.fromkeys(
            ("submitted", "completed", "dropped", "failed", "captures", "hung", "larger_shape"), 0
        )
        self._engines = dict(engines or {})
        unknown = set(self._engines) - set(STAGES)
        if unknown:
            raise ValueError(f"engines: {sorted(unknown)} are not stages ({', '.join(STAGES)})")
        if "denoise" in self._engines and (
            self.config.adaptive_steps or self.config.handover_settings.guided
        ):
            raise ValueError(
                "engines: a denoise engine runs its own loop; it cannot serve adaptive_steps or the "
                f"{self.config.handover} hand-over (they change the denoising loop)"
            )
        # One runner per input shape; each holds a denoise graph per step count it has served.
        self._runners: dict[tuple[int, int, int], StageRunner] = {}
        self.compile_cache = use_compile_cache(self.config)  # before anything compiles
        # Compiled functions are kept whole inside the compile cache, so a warm start loads, not traces.
        precompiled_dir = None
        if self.compile_cache is not None and self.config.precompile:
            precompiled_dir = self.compile_cache.path / "precompiled"
        self._compiled = CompiledFunctions(precompiled_dir)
        if self.cuda:
            # Priorities: the denoise loop is hundreds of small kernels that only need a few SMs each, the
            # prefix is a few large GEMMs that take them all; the denoise stream is put first in line so
            # that the prefix would fill what the denoise leaves idle. Measured on an H100, it did not
            # help: overlapped, the denoise loop still slows down (docs/performance.md, "Why pipelining
            # gains little"); kept because it costs nothing and is the right order where it is honoured.
            high, low = -100, 0  # lower is more urgent; out-of-range values clamp to the device's range
            priority = {"h2d": high, "d2h": high, "denoise": high, "vision": low, "prefix": low}
            self._streams = {
                name: torch.cuda.Stream(self.device, priority=priority[name])
                for name in ("h2d", *STAGES, "d2h")
            }
            self._pools = {stage: torch.cuda.graph_pool_handle() for stage in STAGES}
            blocking = self.config.device_wait == "block"  # only the host's waits differ (RuntimeConfig)
            self._events = [
                {n: torch.cuda.Event(enable_timing=True, blocking=blocking) for n in EVENT_NAMES}
                for _ in range(HOST_RING)
            ]
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        self._origin_host = time.perf_counter()
        # The last frame that used each pipeline slot: its events gate the slot's reuse.
        self._slot_owner: list[Frame | None] = [None] * PIPELINE_SLOTS
        self._next_index = 0  # frames submitted
        self._issued = 0  # frames sent to the device (dispatcher thread only)
        self._pending: Frame | None = None
        self._in_flight = 0
        self.peak_in_flight = 0  # the most frames on the device at once (1 while latency first)
        self._pipelining = PipeliningChooser(self.config.pipelining, MAX_IN_FLIGHT)
        self._on_device: dict[int, Frame] = {}  # issued, not completed: what the watchdog watches
        self._hung: DeviceHung | None = None  # cleared when the device answers again
        self._broken: DeviceFailed | None = None  # for good: the device could not drain after a failure
        self._closed = False
        self._cond = threading.Condition()
        self._infer_lock = threading.Lock()  # one synchronous `infer` at a time
        self._noise, self._noise_lock = self.config.noise_generator(), threading.Lock()
        self._completions: queue.Queue = queue.Queue()
        self._captures_running, self._capture_ended = 0, float("-inf")  # infer waits out a capture
        self._profiles_served: set[ShapeProfile] = set()  # a frame of each completed (the completer's)
        # per profile: how long its last frame kept the executor busy after dispatch (written by the
        # completer, read by the dispatcher for the garbage collector's timing)
        self._busy_s: dict[ShapeProfile, float] = {}
        if profiles is None:
            ladder = steps_ladder(self.config.denoising_steps) if self.config.adaptive_steps else ()
            batches = batch_sizes(self.config.max_batch, self.config.batch_profiles)
            sizes = [(self.config.model.num_views, self.config.model.max_token_len)]
            sizes += [size for size in self.config.ahead_shape_sizes if size not in sizes]
            steps = (self.config.denoising_steps, *ladder[1:])
            profiles = [ShapeProfile(v, t, s, b) for s in steps for (v, t) in sizes for b in batches]
        started = time.perf_counter()
        self.garbage_collector: WhileDeviceBusy | None = None
        executor_started()
        try:
            for profile in profiles:
                self._runner(profile)  # capture ahead of time (a step count: its denoise graphs only)
            built_here = {} if parts is not None else self.parts.startup_s  # parts given: built before
            self.startup_s = {**built_here, "compile_and_capture": time.perf_counter() - started}
            # On the GPU only: on the CPU a frame is computed while it is issued, so a collection after
            # the issue would only add to the next frame's wait.
            if self.config.garbage_collection == "while_device_busy" and self.cuda:
                self.garbage_collector = WhileDeviceBusy()
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="vla-dispatch", daemon=True)
            self._completer = threading.Thread(target=self._complete_loop, name="vla-complete", daemon=True)
            self._watchdog = threading.Thread(target=self._watch_loop, name="vla-watchdog", daemon=True)
            self._dispatcher.start()
            self._completer.start()
            self._watchdog.start()
        except BaseException:
            # a failed start leaves the collector as it was and what the captures froze freeable (a thread
            # already started ends on its own: it serves nothing and is a daemon)
            if self.garbage_collector is not None:
                self.garbage_collector.close()
            executor_closed()
            raise

    # ------------------------------------------------------------------ public interface
    def default_profile(self, steps: int | None = None, batch: int = 1) -> ShapeProfile:
        cfg = self.config.model
        steps = self.config.denoising_steps if steps is None else steps
        return ShapeProfile(cfg.num_views, cfg.max_token_len, steps, batch)

    def submit(
        self,
        obs: Observation,
        noise: np.ndarray | None = None,
        steps: int | None = None,
        previous: PreviousChunk | None = None,
    ) -> Future:
        """Queue an observation; the future resolves to its ActionChunk, or to FrameDropped when a newer
        observation replaced it before it reached the device. Bad input raises ValueError here."""
        return self.submit_batch([obs], None if noise is None else [noise], steps, [previous])[0]

    def submit_batch(
        self,
        observations: list[Observation],
        noises: list[np.ndarray | None] | None = None,
        steps: int | None = None,
        previous: list[PreviousChunk | None] | None = None,
    ) -> list[Future]:
        """Queue observations of several robots as one frame, computed in one batch (the smallest batch
        profile that holds them, up to `max_batch`); one future each. Newest wins as for `submit`: a
        frame still waiting is replaced, all its members dropped. A bad member raises ValueError naming
        its index, and nothing is queued."""
        n = len(observations)
        self._check_batch(n, steps)
        noises = noises if noises is not None else [None] * n
        previous = previous if previous is not None else [None] * n
        if len(noises) != n or len(previous) != n:
            raise ValueError(f"noises, previous: one per observation ({n})")
        members = []
        for i, (obs, noise, prev) in enumerate(zip(observations, noises, previous, strict=True)):
            try:
                members.append(self.prepare(obs, noise, prev))
            except ValueError as err:
                raise (ValueError(f"observations[{i}]: {err}") if n > 1 else err) from None
        return self.submit_prepared(members, steps)

    def submit_prepared(self, members: list[Member], steps: int | None = None) -> list[Future]:
        """`submit_batch` for members made by `prepare` (a server checks each robot's input as it comes and
        batches later)."""
        n = len(members)
        self._check_batch(n, steps)
        profile, larger_shape = self._profile_for(members, steps)
        with self._cond:
            if self._closed:
                raise ExecutorClosed("executor is closed")
            if self._broken or self._hung:
                for m in members:
                    m.future.set_exception(self._broken or self._hung)
                return [m.future for m in members]
            frame = Frame(self._next_index, members, profile, time.perf_counter(), larger_shape=larger_shape)
            self._next_index += 1
            self.counters["submitted"] += 1
            dropped, self._pending = self._pending, frame
            if self.garbage_collector is not None:
                self.garbage_collector.active()
            self._cond.notify_all()
        if dropped is not None:
            self._drop(dropped, f"frame {dropped.index} replaced by newer frame {frame.index}")
        return [m.future for m in members]

    def _profile_for(self, members: list[Member], steps: int | None) -> tuple[ShapeProfile, bool]:
        """The full shape, or with shape_profiles the smallest that holds every member; without
        capture_new_shapes, the smallest captured one that holds them (the full shape, captured at start,
        always does), preferring those with the frame's step count captured. And whether that shape is
        larger than the members' own."""
        full = self.default_profile(steps, batch=self.batch_profile(len(members)))
        if not self.config.shape_profiles:
            return full, False
        views = max(1, max(m.cameras_present for m in members))
        tokens = max(m.prompt_tokens for m in members)
        exact = ShapeProfile(views, prompt_bucket(tokens, full.prompt_len), full.steps, full.batch)
        if self.config.capture_new_shapes:
            return exact, False
        per_view = self.config.model.vision.tokens_per_image
        with self._cond:
            holding = [
                (full.steps not in runner.schedules, v * per_view + t, v, t)  # ready first, then the shortest
                for (v, t, b), runner in self._runners.items()
                if b == exact.batch and v >= views and t >= exact.prompt_len
            ]
        if not holding:  # nothing captured holds it (no full shape captured at start): capture it
            return exact, False
        _, _, views, tokens = min(holding)
        return ShapeProfile(views, tokens, full.steps, full.batch), (views, tokens) != (
            exact.views,
            exact.prompt_len,
        )

    def _check_batch(self, n: int, steps: int | None) -> None:
        if not 1 <= n <= self.config.max_batch:
            raise ValueError(
                f"observations: {n} in one batch; this executor serves 1..{self.config.max_batch}"
            )
        self.check_steps(steps)

    def check_steps(self, steps: int | None) -> None:
        """ValueError naming `steps` when a frame cannot ask for that many denoising steps (None: the
        configured ones)."""
        if steps is None:
            return
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
            raise ValueError(f"steps: a whole number of denoising steps, got {steps!r}")
        self.default_profile(int(steps))  # its range
        if "denoise" in self._engines and steps != self.config.denoising_steps:
            raise ValueError(f"steps: the denoise engine runs its own loop; {steps} steps cannot be asked")

    def batch_profile(self, n: int) -> int:
        """The batch profile a batch of n observations runs in (runtime/buffers.py; the configuration's
        set of profiles)."""
        return batch_profile(n, self.config.batch_profiles)

    def batching_in_flight(self) -> int:
        """How many frames a caller that batches lets on the device before it submits the next: one fewer
        than the pipelining mode allows now, at least one (1: it submits only to an idle device)."""
        return max(1, self._pipelining.in_flight_limit() - 1)

    def wait_for_room(self, timeout: float | None = None, in_flight: int | None = None) -> bool:
        """Until a frame submitted now goes to the device at once: none is pending and fewer than
        `in_flight` are on the device (default `batching_in_flight()`; a caller that batches keeps its
        observations until then, where it can still choose among them). False when `timeout` passes
        first; ExecutorClosed once closed. True at once while the device is hung or broken, whatever is on
        it: a frame submitted then fails at once (DeviceHung, DeviceFailed), so a caller holding
        observations hands them on to fail instead of keeping them until the device answers."""

        def allowed() -> int:  # read as the wait goes on: the mode may change meanwhile
            if in_flight is None:
                return self.batching_in_flight()
            return min(in_flight, self._pipelining.in_flight_limit())

        def room_or_no_device() -> bool:
            if self._closed or self._hung is not None or self._broken is not None:
                return True
            return self._pending is None and self._in_flight < allowed()

        with self._cond:
            room = self._cond.wait_for(room_or_no_device, timeout)
            if self._closed:
                raise ExecutorClosed("executor is closed")
            return room

    def prepare(
        self, obs: Observation, noise=None, previous: PreviousChunk | None = None, draw_noise=None
    ) -> Member:
        """One observation checked (ValueError naming the field) and prepared for a frame. Without `noise`,
        `draw_noise()` (default: the executor's own generator) gives it once the observation has passed its
        checks, so a refused one takes no draw from the sequence."""
        received = time.perf_counter()
        # the input rate: each observation as it comes (a server prepares as robots submit, batches later)
        self._pipelining.arrived(received)
        inputs = self.parts.preparer(obs)
        previous, handover = self.parts.prepare_handover(previous)
        if noise is not None:
            noise = self.parts.check_noise(noise)
        elif draw_noise is not None:
            noise = draw_noise()
        else:
            with self._noise_lock:  # a Generator is not thread-safe; submit order fixes the sequence
                noise = self._noise.standard_normal(
                    (self.config.model.action_horizon, self.config.model.action_dim), dtype=np.float32
                )
        prepare_ms = (time.perf_counter() - received) * 1e3
        return Member(obs.timestamp, inputs, noise, previous, handover, Future(), received, prepare_ms)

    def infer(
        self, obs: Observation, noise: np.ndarray | None = None, previous: PreviousChunk | None = None
    ) -> ActionChunk:
        """One observation, synchronously. Callers on several threads each get their own answer: a
        frame submitted here is never replaced by another caller's (only `submit` is newest-wins)."""
        with self._infer_lock:
            future = self.submit(obs, noise, previous=previous)
            give_up = time.monotonic() + CAPTURE_TIMEOUT_S
            while True:
                try:
                    return future.result(timeout=self._idle_timeout())
                except TimeoutError:
                    # a new shape's compilation can take a minute: waited out, within a bound
                    if self._closed or not self._capturing_recently() or time.monotonic() > give_up:
                        raise

    def _capturing_recently(self) -> bool:
        """A profile is being captured, or was within the last idle timeout."""
        with self._cond:
            recent = time.monotonic() - self._capture_ended < self._idle_timeout()
            return self._captures_running > 0 or recent

    def reset(self) -> None:
        """Drop the pending frame and wait until the device is idle; DeviceHung if it does not get there
        within the device timeout."""
        with self._cond:
            dropped, self._pending = self._pending, None
            self._cond.notify_all()
        if dropped is not None:
            self._drop(dropped, "executor reset")
        if self._device_error() is not None:
            raise self._device_error()
        if not self.wait_idle():
            raise DeviceHung(f"reset: the device did not finish within {self._idle_timeout():.0f} s")

    def _idle_timeout(self) -> float:
        """Long enough for every frame that can be in flight, each within the device timeout."""
        return self.config.device_timeout * (MAX_IN_FLIGHT + 1)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until nothing is pending or on the device; False when `timeout` (default: the device timeout
        for every frame in flight) passes first."""
        timeout = self._idle_timeout() if timeout is None else timeout
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and self._in_flight == 0, timeout)

    def close(self) -> None:
        """Stop taking frames, fail the pending one, let those on the device finish (within the device
        timeout; a hung device's threads are left behind, as daemons, rather than hanging the caller)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            dropped, self._pending = self._pending, None
            self._cond.notify_all()
        if dropped is not None:
            self._drop(dropped, "executor closed")
        deadline = time.monotonic() + self._idle_timeout()
        self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        if not self._dispatcher.is_alive():  # else its last frame would queue behind the stop sentinel
            self._completions.put(None)
            self._completer.join(max(0.0, deadline - time.monotonic()))
        self._watchdog.join(max(0.0, deadline - time.monotonic()))
        if self._completer.is_alive() or self._dispatcher.is_alive():
            log.error(
                "close: the device did not finish within %.0f s; its threads are left behind",
                self._idle_timeout(),
            )
        executor_closed()  # this executor's objects can be freed (the others' are frozen again)
        if self.garbage_collector is not None:
            self.garbage_collector.close()

    def health(self) -> dict:
        """`ready`, `state` (serving / hung / closed), `error` (why not ready), and the report."""
        report = self.report()
        with self._cond:
            problem = self._broken or self._hung
            state = (
                "closed"
                if self._closed
                else "failed"
                if self._broken
                else "hung"
                if self._hung
                else "serving"
            )
            error = str(problem) if problem is not None else ""
        return {"ready": state == "serving", "state": state, "error": error, **report}

    def report(self) -> dict:
        with self._cond:
            counters = dict(self.counters)
            profiles = [
                {"views": v, "prompt_len": n, "batch": b, "steps": sorted(runner.schedules)}
                for (v, n, b), runner in self._runners.items()
            ]
        return {
            "counters": counters,
            "latency_ms": self.stats.summary(),
            "graphs": self.use_graphs,
            "profiles": profiles,
            "compile_cache": self.compile_cache.describe() if self.compile_cache else None,
            "precompiled": self._compiled.counts(),
            "pipelining": {**self._pipelining.report(), "peak_in_flight": self.peak_in_flight},
            "startup_s": dict(self.startup_s),
        }

    def describe_startup(self) -> str:
        """Where start-up went, for the ready line: "weights 3.1 s, quantise 8.0 s, ...", the compile cache
        and how its compiled functions were come by, and a hint where Python's bytecode is not kept."""
        line = ", ".join(f"{name.replace('_', ' ')} {s:.1f} s" for name, s in self.startup_s.items())
        if self.compile_cache:
            line += f"; {self.compile_cache.describe()}"
            counts = self._compiled.counts()
            if counts:
                line += f" (functions: {', '.join(f'{n} {how}' for how, n in counts.items())})"
        if self.config.use_compile and not bytecode_kept():
            line += f"; {BYTECODE_HINT}"
        return line

    # ------------------------------------------------------------------ graphs and buffers per profile
    def _captured(self, profile: ShapeProfile) -> bool:
        runner = self._runners.get(profile.input_shape)
        return runner is not None and profile.steps in runner.schedules

    def _runner(self, profile: ShapeProfile) -> StageRunner:
        """The profile's runner, captured: a new input shape captures every stage, a new step count on a
        known shape the denoise stage only."""
        if self._captured(profile):
            return self._runners[profile.input_shape]
        with self._cond:
            self._captures_running += 1
        try:
            return self._capture(profile)
        finally:
            with self._cond:
                self._captures_running -= 1
                self._capture_ended = time.monotonic()
            freeze_long_lived()  # what a capture made lives as long as the executor: never scanned again

    def _capture(self, profile: ShapeProfile) -> StageRunner:
        runner = self._runners.get(profile.input_shape)
        if runner is not None and profile.steps not in runner.schedules:
            with self._cond:  # report() reads the schedules
                runner.add_steps(profile.steps)
            try:
                captures = (
                    runner.capture(self._streams, self._pools, ("denoise",), (profile.steps,))
                    if self.use_graphs
                    else 0
                )
            except Exception:
                with self._cond:  # not captured: the next frame of this step count tries again
                    runner.forget_steps(profile.steps)
                raise
            with self._cond:
                self.counters["captures"] += captures
        if runner is None:
            buffers = StaticBuffers(self.config.model, profile, self.device, self.parts.model.compute_dtype)
            runner = StageRunner(
                self.parts.model,
                buffers,
                self.device,
                self.config.use_compile,
                self._compiled,
                self.config.compile_scope,
                engines=self._engines,
                handover=self.config.handover_settings,
            )
            captures = runner.capture(self._streams, self._pools) if self.use_graphs else 0
            with self._cond:
                self.counters["captures"] += captures
                self._runners[profile.input_shape] = runner
        return runner

    # ------------------------------------------------------------------ dispatcher thread
    def _drop(self, frame: Frame, why: str) -> None:
        with self._cond:
            self.counters["dropped"] += 1
        _resolve_all(frame, error=FrameDropped(why))

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                # Take the newest pending frame only once there is room on the device, so that anything
                # submitted while we wait replaces it (newest wins).
                self._cond.wait_for(
                    lambda: (
                        self._closed
                        or (
                            self._pending is not None and self._in_flight < self._pipelining.in_flight_limit()
                        )
                    )
                )
                if self._closed:
                    return
                frame, self._pending = self._pending, None
                if not self._captured(frame.profile) and self._in_flight:
                    # A new profile is captured with the device idle (capture synchronises the device).
                    self._pending = frame
                    self._cond.wait_for(lambda: self._in_flight == 0 or self._closed)
                    continue
                self._in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
                self._cond.notify_all()  # the pending frame is taken (a waiter may submit the next)
            if self._device_error() is not None:  # taken while a hang was being declared: not issued
                self._leave_device(frame, "failed")
                _resolve_all(frame, error=self._device_error())
                continue
            try:
                self._issue(frame)
            except Exception as err:  # noqa: BLE001 - reported through the frame's future, the loop goes on
                log.exception("frame %d failed while being issued", frame.index)
                self._recover_from_failed_issue(frame, err)
                self._leave_device(frame, "failed")
                _resolve_all(frame, error=err)
                continue
            self._completions.put(frame)
            if self.garbage_collector is not None:  # the device has the frame: the host may pause
                with self._cond:
                    alone = self._in_flight == 1  # no other frame's completion would wait for the pause
                if alone:
                    self.garbage_collector.after_issue(self._busy_s.get(frame.profile))

    def _leave_device(self, frame: Frame, outcome: str) -> None:
        """Every frame that was taken leaves here, once: counted, and the hang cleared when the device
        holds nothing any more."""
        with self._cond:
            self.counters[outcome] += 1
            self._in_flight -= 1
            self._on_device.pop(frame.index, None)
            if self.garbage_collector is not None:
                self.garbage_collector.active()
            if not self._on_device:
                self._hung = None  # the device came back: serve again
            self._cond.notify_all()

    def _device_error(self) -> Exception | None:
        with self._cond:
            return self._broken or self._hung

    def _recover_from_failed_issue(self, frame: Frame, err: Exception) -> None:
        """Part of the frame's steps may be on the device, with events the next user of its slot would
        wait on never recorded: let the device drain (frames before it complete as usual); then nothing
        on the device uses the slot or the frame's pinned ring entry, and the next frame takes both
        (its issue number is not used up). A device that cannot drain (a sticky CUDA error) leaves the
        executor broken: every later frame fails with that error and health says so."""
        try:
            if self.cuda:
                for stream in self._streams.values():
                    stream.synchronize()  # a hang here is reported by the watchdog
        except Exception as drain_err:  # noqa: BLE001
            log.exception("the device did not drain after frame %d failed", frame.index)
            with self._cond:
                self._broken = DeviceFailed(f"{drain_err} (after frame {frame.index} failed: {err})")
            return
        self._slot_owner[frame.slot] = None
        if frame.issue_number is not None:
            self._issued = frame.issue_number

    @torch.inference_mode()
    def _issue(self, frame: Frame) -> None:
        runner = self._runner(frame.profile)
        buffers = runner.buffers
        frame.dispatched = time.perf_counter()
        if frame.larger_shape:
            with self._cond:
                self.counters["larger_shape"] += 1
        # Slots and ring entries go by issue order (dropped frames never reach the device).
        frame.issue_number = self._issued
        frame.slot = self._issued % PIPELINE_SLOTS
        frame.ring = self._issued % HOST_RING
        self._issued += 1
        host = buffers.host_ring[frame.ring]
        device_slot = buffers.device_slots[frame.slot]
        # The ring entry's previous frame has completed. Rows past the members repeat the first member: a
        # batch profile larger than the batch computes them, and nothing reads their results.
        rows = [m.arrays(frame.profile) for m in frame.members]
        for row in range(frame.profile.batch):
            for name, array in (rows[row] if row < len(rows) else rows[0]).items():
                host.inputs[name].numpy()[row] = array
        with self._cond:
            frame.on_device_since = time.monotonic()
            self._on_device[frame.index] = frame
        if self.cuda:
            self._issue_cuda(frame, runner, host, device_slot)
        else:
            self._run_cpu(frame, runner, host, device_slot)
        self._slot_owner[frame.slot] = frame

    def _issue_cuda(self, frame: Frame, runner: StageRunner, host, device_slot) -> None:
        ev = self._events[frame.ring]
        prev = self._slot_owner[frame.slot]
        prev_ev = self._events[prev.ring] if prev is not None else None
        for step in PIPELINE:
            stream, waits = self._streams[step.stream], WAITS[step.name]
            with torch.cuda.stream(stream):
                for name in waits.this_frame:
                    stream.wait_event(ev[f"{name}_end"])
                if prev_ev is not None:
                    for name in waits.previous_user:
                        stream.wait_event(prev_ev[f"{name}_end"])
                ev[f"{step.name}_start"].record()
                self._run_step(step, runner, frame, host, device_slot)
                ev[f"{step.name}_end"].record()

    def _run_cpu(self, frame: Frame, runner: StageRunner, host, device_slot) -> None:
        for step in PIPELINE:  # in order, on this thread
            start = time.perf_counter()
            self._run_step(step, runner, frame, host, device_slot)
            frame.host_ms[step.name] = (start, time.perf_counter())

    def _run_step(self, step: Step, runner: StageRunner, frame: Frame, host, device_slot) -> None:
        """A copy in (the h2d stream), a stage, or the copy out (d2h), on the current stream."""
        if step.stream == "h2d":
            for name in step.writes:
                device_slot.input(name).copy_(host.inputs[name], non_blocking=self.cuda)
            if "pixels" in step.writes:  # resize_on_device: the raw images, on this (the copy's) stream
                pixels = device_slot.input("pixels")  # [B, V, S, S, 3]
                views = pixels.shape[1]
                raw = {  # every robot's at once: one resize for each run of images of one size
                    row * views + slot: image
                    for row, member in enumerate(frame.members)
                    for slot, image in member.raw_views(frame.profile).items()
                }
                place_raw_images(pixels.view(-1, *pixels.shape[2:]), raw)  # a view: written in place
        elif step.stream == "d2h":
            host.actions.copy_(device_slot.actions, non_blocking=self.cuda)
        else:
            runner.run(step.name, frame.slot, frame.profile.steps)

    # ------------------------------------------------------------------ completion thread
    def _complete_loop(self) -> None:
        while True:
            frame = self._completions.get()
            if frame is None:
                return
            try:
                chunks = self._finish(frame)
            except Exception as err:  # noqa: BLE001
                log.exception("frame %d failed on completion", frame.index)
                self._leave_device(frame, "failed")
                _resolve_all(frame, error=err)
            else:
                self._leave_device(frame, "completed")
                for member, chunk in zip(frame.members, chunks, strict=True):
                    resolve(member.future, result=chunk)
                if frame.profile not in self._profiles_served:  # (this thread's alone)
                    # what a profile's first frame built, the later ones reuse; no collection first, here
                    # while serving (a few objects of the moment may stay frozen), then marked served
                    freeze_long_lived(collect=False)
                    self._profiles_served.add(frame.profile)

    # ------------------------------------------------------------------ watchdog thread
    def _watch_loop(self) -> None:
        """Fail the futures of frames on the device past `device_timeout_s` (the completion thread is
        blocked in the device's synchronize), and refuse new frames until the device answers again. With
        the executor's collections, run the one due while idle (WhileDeviceBusy.when_idle)."""
        timeout = self.config.device_timeout
        while True:
            with self._cond:
                self._cond.wait(timeout / 4)
                if self._closed and not self._on_device:
                    return
                now = time.monotonic()
                late = [f for f in self._on_device.values() if now - f.on_device_since > timeout]
                if not late or self._hung is not None:
                    idle = self._in_flight == 0 and self._pending is None  # nothing taken either
                    idle_collector = self.garbage_collector if idle else None
                    hung = None
                else:
                    oldest = min(late, key=lambda f: f.index)
                    hung = self._hung = DeviceHung(
                        f"frame {oldest.index} has been on the device for "
                        f"{now - oldest.on_device_since:.1f} s (device_timeout_s {timeout:g})"
                    )
                    stuck, pending = list(self._on_device.values()), self._pending
                    self._pending = None
                    self.counters["hung"] += 1
                    self.counters["dropped"] += pending is not None  # never reached the device
                    self._cond.notify_all()
            if hung is None:
                if idle_collector is not None:  # outside the lock: a submit meanwhile waits for the pause
                    idle_collector.when_idle()
                continue
            log.error("device hung: %s", hung)
            for frame in stuck + ([pending] if pending is not None else []):
                _resolve_all(frame, error=hung)

    def _finish(self, frame: Frame) -> list[ActionChunk]:
        runner = self._runners[frame.profile.input_shape]
        host = runner.buffers.host_ring[frame.ring]
        if self.cuda:
            ev = self._events[frame.ring]
            ev[f"{STEP_NAMES[-1]}_end"].synchronize()
            spans = {name: (ev[f"{name}_start"], ev[f"{name}_end"]) for name in STEP_NAMES}
            timings = {name: a.elapsed_time(b) for name, (a, b) in spans.items()}
            timings["device_total"] = spans[STEP_NAMES[0]][0].elapsed_time(spans[STEP_NAMES[-1]][1])
            for name, (a, b) in spans.items():
                self.trace.add(
                    name,
                    f"{name} f{frame.index}",
                    self._origin.elapsed_time(a),
                    self._origin.elapsed_time(b),
                    frame.index,
                )
        else:
            timings = {stage: (b - a) * 1e3 for stage, (a, b) in frame.host_ms.items()}
            for stage, (a, b) in frame.host_ms.items():
                self.trace.add(
                    stage,
                    f"{stage} f{frame.index}",
                    (a - self._origin_host) * 1e3,
                    (b - self._origin_host) * 1e3,
                    frame.index,
                )
        actions = host.actions.numpy().copy()  # [batch, H, A]: one row per member (and padding)
        finished = [self.parts.finish_chunk(actions[i], m.previous) for i, m in enumerate(frame.members)]
        done = time.perf_counter()
        self._pipelining.served(done - frame.dispatched)
        self._busy_s[frame.profile] = done - frame.dispatched
        # From the earliest member's `prepare` on: the host's preparation and, where a server holds
        # prepared observations to batch them, that wait are part of what the robot waits for.
        first = min(frame.members, key=lambda m: m.received)
        timings["prepare"] = first.prepare_ms
        timings["held_before_frame"] = (frame.submitted - first.received) * 1e3 - first.prepare_ms
        timings["queue_wait"] = (frame.dispatched - frame.submitted) * 1e3
        timings["total"] = (done - first.received) * 1e3
        self.stats.add_all(timings)
        return [
            ActionChunk(
                timestamp=m.obs_timestamp,
                timings_ms=dict(timings),
                steps=frame.profile.steps,
                model_id=self.parts.model_id,
                random_weights=self.parts.random_weights,
                **f,
            )
            for m, f in zip(frame.members, finished, strict=True)
        ]


def _resolve_all(frame: Frame, error: BaseException) -> None:
    for member in frame.members:
        resolve(member.future, error=error)


def resolve(future: Future, result=None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one: the watchdog failed it (a hung frame that came
    back), or its caller cancelled it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
