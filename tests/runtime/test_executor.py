"""The pipelined executor on the CPU: same results as the eager reference, ordering, slot reuse, newest-wins
dropping, futures, errors, the watchdog and the stage-engine seam. (Streams, graphs and overlap are
checked on a GPU in tests/gpu.) Threads are ordered by holding the stages (on the CPU they run on the
dispatcher thread) and by waiting for the executor's own state, never by sleeping."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
from vla_runtime.runtime import collector
from vla_runtime.runtime.buffers import MAX_IN_FLIGHT
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import DeviceHung, FrameDropped, PipelinedExecutor
from vla_runtime.runtime.hazards import STEP_NAMES
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.stages import StageRunner

from ..conftest import random_observation


@pytest.fixture(scope="module", params=["pi05_tiny", "pi0_tiny"])
def pair(request):
    executor = PipelinedExecutor(RuntimeConfig(preset=request.param))
    reference = EagerPolicy(parts=executor.parts)
    yield executor, reference
    executor.close()


def noise_for(cfg, rng):
    return rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)


class HeldStages:
    """Holds every stage of the executor's default profile until released (a busy device)."""

    def __init__(self, executor: PipelinedExecutor):
        self.runner: StageRunner = executor._runners[executor.default_profile().input_shape]
        self.original = self.runner.run
        self.open = threading.Event()
        self.runner.run = self._run

    def _run(self, stage, slot, steps=None):
        assert self.open.wait(60), "held stages never released"
        return self.original(stage, slot, steps)

    def release(self):
        self.open.set()

    def restore(self):
        self.open.set()
        self.runner.run = self.original


class FailsOnce:
    """Makes `stage` raise `times` times, after running `after` times (a failure once the stages before
    it were issued)."""

    def __init__(self, executor: PipelinedExecutor, stage: str, times: int = 1, after: int = 0):
        self.runner = executor._runners[executor.default_profile().input_shape]
        self.original, self.stage, self.left, self.runs = self.runner.run, stage, times, -after
        self.runner.run = self._run

    def _run(self, stage, slot, steps=None):
        if stage == self.stage:
            self.runs += 1
            if self.runs > 0 and self.left:
                self.left -= 1
                raise RuntimeError(f"injected {stage} failure")
        return self.original(stage, slot, steps)

    def restore(self):
        self.runner.run = self.original


def wait_dispatched(executor: PipelinedExecutor) -> None:
    """Until the dispatcher has taken the pending frame."""
    with executor._cond:
        assert executor._cond.wait_for(lambda: executor._pending is None, 30)


def test_matches_reference_over_changing_frames_with_drops(pair, rng):
    """24 bursts of 5 frames, each burst submitted while the first is held on the device: the three in
    between are replaced by the newest (dropped), the first and the newest are delivered, and every
    delivered chunk equals the reference on its own inputs and noise (bit-exact on the CPU)."""
    executor, reference = pair
    cfg = executor.config.model
    frames = [(random_observation(rng, executor.config.preset), noise_for(cfg, rng)) for _ in range(120)]
    before = dict(executor.counters)
    futures = []
    for burst in range(0, 120, 5):
        held = HeldStages(executor)
        try:
            futures.append(executor.submit(*frames[burst]))
            wait_dispatched(executor)
            futures += [executor.submit(obs, noise) for obs, noise in frames[burst + 1 : burst + 5]]
        finally:
            held.restore()
        assert executor.wait_idle()
    for i, ((obs, noise), future) in enumerate(zip(frames, futures, strict=True)):
        if i % 5 in (1, 2, 3):
            assert isinstance(future.exception(timeout=60), FrameDropped)
            continue
        chunk = future.result(timeout=60)
        assert chunk.timestamp == obs.timestamp
        np.testing.assert_array_equal(chunk.actions, reference.infer(obs, noise).actions)
    assert executor.counters["dropped"] - before["dropped"] == 72
    assert executor.counters["completed"] - before["completed"] == 48


def test_sequential_frames_alternate_slots_and_reuse_buffers(pair, rng):
    executor, _ = pair
    runner: StageRunner = executor._runners[executor.default_profile().input_shape]
    kv_ptrs = [slot.kv_cache.data_ptr() for slot in runner.buffers.device_slots]
    seen_slots = []
    original = runner.run

    def spy(stage, slot, steps=None):
        if stage == "prefix":
            seen_slots.append(slot)
        return original(stage, slot, steps)

    runner.run = spy
    try:
        for _ in range(6):
            executor.infer(random_observation(rng, executor.config.preset))
    finally:
        runner.run = original
    assert seen_slots[:6] in ([0, 1] * 3, [1, 0] * 3)
    assert [
        slot.kv_cache.data_ptr() for slot in runner.buffers.device_slots
    ] == kv_ptrs  # nothing reallocated


def test_frames_in_flight_together_complete_in_submission_order(pair, rng):
    """MAX_IN_FLIGHT frames on the device at once (their completion held): they resolve in the order
    submitted, none dropped, each with its timings, and the counters move by exactly that many."""
    executor, _ = pair
    before = executor.report()
    finish, release = executor._finish, threading.Event()
    executor._finish = lambda frame: (release.wait(60), finish(frame))[1]
    order, futures = [], []
    try:
        for i in range(MAX_IN_FLIGHT):
            future = executor.submit(random_observation(rng, executor.config.preset))
            future.add_done_callback(lambda _, i=i: order.append(i))
            futures.append(future)
            wait_dispatched(executor)  # on the device before the next is submitted: nothing replaced
        with executor._cond:
            assert executor._in_flight == MAX_IN_FLIGHT and not order
        release.set()
        chunks = [f.result(timeout=60) for f in futures]
    finally:
        release.set()
        executor._finish = finish
    assert order == list(range(MAX_IN_FLIGHT))
    for chunk in chunks:
        t = chunk.timings_ms
        assert set(STEP_NAMES) | {"queue_wait", "total"} <= set(t)
        assert t["total"] >= t["queue_wait"] + sum(t[name] for name in STEP_NAMES)  # spans inside the total
    after = executor.report()
    assert after["counters"]["submitted"] - before["counters"]["submitted"] == MAX_IN_FLIGHT
    assert after["counters"]["completed"] - before["counters"]["completed"] == MAX_IN_FLIGHT
    assert after["latency_ms"]["denoise"]["n"] - before["latency_ms"]["denoise"]["n"] == MAX_IN_FLIGHT


def test_bad_input_raises_and_executor_keeps_serving(pair, rng):
    executor, reference = pair
    obs = random_observation(rng, executor.config.preset)
    obs.state = np.full(8, np.nan, np.float32)
    with pytest.raises(ValueError, match="state"):
        executor.submit(obs)
    with pytest.raises(ValueError, match="noise"):
        executor.submit(random_observation(rng, executor.config.preset), np.zeros(3, np.float32))
    good, noise = random_observation(rng, executor.config.preset), noise_for(executor.config.model, rng)
    np.testing.assert_array_equal(executor.infer(good, noise).actions, reference.infer(good, noise).actions)


def test_other_step_counts_get_their_own_profile(pair, rng):
    executor, _ = pair
    obs = random_observation(rng, executor.config.preset)
    noise = noise_for(executor.config.model, rng)
    three = executor.submit(obs, noise, steps=3).result()
    # the same buffers, vision and prefix: only the denoise stage gets a schedule (and graphs) for 3 steps
    assert three.steps == 3 and len(executor._runners) == 1
    assert 3 in executor._runners[executor.default_profile().input_shape].schedules
    parts = executor.parts
    reference3 = EagerPolicy(parts=type(parts)(**{**vars(parts), "config": parts.config.replace(steps=3)}))
    np.testing.assert_array_equal(three.actions, reference3.infer(obs, noise).actions)


def test_trace_has_every_step_in_pipeline_order(pair, rng):
    executor, _ = pair
    executor.trace = type(executor.trace)()
    for _ in range(3):
        executor.infer(random_observation(rng, executor.config.preset))
    trace = executor.trace.to_chrome()
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert lanes == set(STEP_NAMES)
    by_frame: dict[int, list] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            by_frame.setdefault(e["args"]["frame"], []).append((e["ts"], e["ts"] + e["dur"], e["cat"]))
    assert len(by_frame) == 3
    for spans in by_frame.values():  # on the CPU the steps run one after another, in the table's order
        spans.sort()
        assert [lane for _, _, lane in spans] == list(STEP_NAMES)
        assert all(
            end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:], strict=False)
        )


def test_reset_and_close_resolve_every_future(rng):
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"))
    held = HeldStages(executor)
    futures = [executor.submit(random_observation(rng))]
    wait_dispatched(executor)  # frame 0 is on the (held) device
    futures += [executor.submit(random_observation(rng)) for _ in range(7)]
    resetter = threading.Thread(target=executor.reset)
    resetter.start()
    # reset drops the pending frame before it waits for the device; nothing else can resolve it while
    # the device is held
    assert "reset" in str(futures[-1].exception(timeout=30))
    held.release()
    resetter.join(30)
    assert not resetter.is_alive()
    late = executor.submit(random_observation(rng))
    assert late.result(timeout=30).actions.shape == (10, 7)
    executor.close()
    assert futures[0].result().actions.shape == (10, 7)  # it was already on the device
    for f in futures[1:-1]:
        assert isinstance(f.exception(), FrameDropped)  # replaced by a newer frame
    assert executor.counters["dropped"] == 7 and executor.counters["completed"] == 2
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(random_observation(rng))


def until(predicate, timeout_s: float = 30.0) -> bool:
    """Polls `predicate` (another thread's effect with nothing to wait on) until true or `timeout_s`."""
    give_up = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def test_what_start_up_made_is_out_of_the_collectors_scans_until_close(rng):
    """runtime/collector.py: after its captures the executor froze every object tracked so far (a full
    collection no longer scans them); a profile's first frame froze what it made (on the completion
    thread, after the chunk is handed over: polled), as did a profile captured later (another step
    count); closed, it no longer counts as live (runtime/collector.py: thawed, or frozen again with the
    executors still alive; test_collector.py checks what that frees)."""
    live = collector._live_executors
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"))
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # modules, the model, the captured profile
        executor.submit(random_observation(rng)).result(timeout=120)
        assert until(lambda: gc.get_freeze_count() > frozen)
        after_first_frame = gc.get_freeze_count()
        executor.submit(random_observation(rng)).result(timeout=120)
        executor.wait_idle()
        assert gc.get_freeze_count() <= after_first_frame  # later frames freeze nothing (some frozen die)
        executor.submit(random_observation(rng), steps=2).result(timeout=120)  # a new profile captured
        assert gc.get_freeze_count() > after_first_frame
        assert collector._live_executors == live + 1
    finally:
        executor.close()
    assert collector._live_executors == live


def test_an_executor_that_fails_to_start_lets_go_of_what_it_froze(monkeypatch):
    live = collector._live_executors

    def failing(self, profile):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(PipelinedExecutor, "_capture", failing)
    with pytest.raises(RuntimeError, match="capture failed"):
        PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"))
    assert collector._live_executors == live


def zero_image_tokens(slot) -> None:
    """A stand-in vision engine: reads nothing, writes the slot's image tokens in place."""
    slot.image_tokens.zero_()


def test_an_engine_given_at_construction_serves_its_stage(rng):
    """The seam: with a vision engine that zeroes the image tokens, two observations that differ only in
    their images give the same actions; with the model's own vision they differ."""
    obs = random_observation(rng)
    other = type(obs)(random_observation(rng).images, obs.state, obs.instruction, obs.timestamp)
    noise = rng.standard_normal((10, 8), dtype=np.float32)
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"), engines={"vision": zero_image_tokens}) as blind:
        np.testing.assert_array_equal(blind.infer(obs, noise).actions, blind.infer(other, noise).actions)
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny")) as seeing:
        assert not np.array_equal(seeing.infer(obs, noise).actions, seeing.infer(other, noise).actions)
    with pytest.raises(ValueError, match="engines"):
        PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"), engines={"vison": zero_image_tokens})


def test_a_failure_while_issuing_fails_that_frame_and_the_next_is_served(pair, rng):
    """The prefix raises after vision has run: that frame's future carries the error, the executor stays
    ready, and the following frames (on both slots) equal the reference."""
    executor, reference = pair
    failing = FailsOnce(executor, "prefix")
    before = dict(executor.counters)
    try:
        failed = executor.submit(random_observation(rng, executor.config.preset))
        with pytest.raises(RuntimeError, match="injected prefix failure"):
            failed.result(timeout=60)
        assert executor.health()["ready"]
        for _ in range(3):
            obs, noise = (
                random_observation(rng, executor.config.preset),
                noise_for(executor.config.model, rng),
            )
            np.testing.assert_array_equal(
                executor.infer(obs, noise).actions, reference.infer(obs, noise).actions
            )
    finally:
        failing.restore()
    assert executor.counters["failed"] - before["failed"] == 1
    assert executor.counters["completed"] - before["completed"] == 3


def test_failed_issues_do_not_hand_a_frame_another_frames_answer(rng):
    """Frame 0 waits in the completion thread while two frames fail at issue and two more are issued:
    the failed ones must not use up host ring entries, or the fourth frame after frame 0 would land on
    frame 0's entry and frame 0 would be answered with its actions."""
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"))
    reference = EagerPolicy(parts=executor.parts)
    obs = random_observation(rng)
    noises = [rng.standard_normal((10, 8), dtype=np.float32) for _ in range(5)]
    finish, release = executor._finish, threading.Event()
    executor._finish = lambda frame: (release.wait(60), finish(frame))[1]
    failing = FailsOnce(executor, "denoise", times=2, after=1)  # frame 0 runs, the next two fail
    try:
        first = executor.submit(obs, noises[0])
        wait_dispatched(executor)
        for noise in noises[1:3]:
            with pytest.raises(RuntimeError, match="injected"):
                executor.submit(obs, noise).result(timeout=60)
        failing.restore()
        later = []
        for noise in noises[3:]:
            later.append(executor.submit(obs, noise))
            wait_dispatched(executor)
        # both issued (on the CPU: computed) and queued behind frame 0 before it is let finish
        deadline = time.monotonic() + 60
        while executor._completions.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # polls the executor's own state; orders nothing
        assert executor._completions.qsize() == 2
        release.set()
        np.testing.assert_array_equal(
            first.result(timeout=60).actions, reference.infer(obs, noises[0]).actions
        )
        for noise, future in zip(noises[3:], later, strict=True):
            np.testing.assert_array_equal(
                future.result(timeout=60).actions, reference.infer(obs, noise).actions
            )
    finally:
        release.set()
        executor.close()


def test_a_hang_then_a_failed_issue_leaves_the_executor_serving(rng):
    """The watchdog declares a hang; the hung frame then fails instead of completing: with nothing left
    on the device the hang is over, and the next frame is served."""
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", device_timeout_s=0.3))
    held = HeldStages(executor)
    failing = FailsOnce(executor, "prefix")
    failing.original = held._run  # held first, then failing
    try:
        stuck = executor.submit(random_observation(rng))
        assert isinstance(stuck.exception(timeout=30), DeviceHung)
        held.release()
        assert executor.wait_idle()
        assert executor.health()["state"] == "serving"
        assert executor.infer(random_observation(rng)).actions.shape == (10, 7)
    finally:
        held.restore()
        executor.close()


def test_a_hung_device_fails_the_frame_and_is_reported_until_it_answers(rng):
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", device_timeout_s=0.3))
    reference = EagerPolicy(parts=executor.parts)
    held = HeldStages(executor)
    try:
        stuck = executor.submit(random_observation(rng))
        assert isinstance(stuck.exception(timeout=30), DeviceHung)  # failed by the watchdog
        health = executor.health()
        assert (health["ready"], health["state"]) == (False, "hung") and "device_timeout_s" in health["error"]
        assert isinstance(executor.submit(random_observation(rng)).exception(timeout=1), DeviceHung)
        assert executor.wait_idle(timeout=0.05) is False
        held.release()  # the device answers again
        assert executor.wait_idle()
        assert executor.health()["state"] == "serving" and executor.counters["hung"] == 1
        obs, noise = random_observation(rng), rng.standard_normal((10, 8), dtype=np.float32)
        np.testing.assert_array_equal(executor.infer(obs, noise).actions, reference.infer(obs, noise).actions)
    finally:
        held.restore()
        executor.close()


def test_close_does_not_wait_forever_for_a_hung_device(rng):
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", device_timeout_s=0.1))
    held = HeldStages(executor)
    executor.submit(random_observation(rng))
    wait_dispatched(executor)
    executor.close()  # returns although the device never answers
    assert not held.open.is_set() and executor.health()["state"] == "closed"
    held.restore()
    executor._dispatcher.join(60)  # let the abandoned frame finish before the interpreter exits


def test_concurrent_infer_callers_each_get_their_own_answer(pair, rng):
    executor, reference = pair
    cfg = executor.config.model
    frames = [(random_observation(rng, executor.config.preset), noise_for(cfg, rng)) for _ in range(6)]
    results: dict[int, np.ndarray] = {}

    def call(i):
        results[i] = executor.infer(*frames[i]).actions

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(frames))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(frames)))  # no caller got FrameDropped
    for i, (obs, noise) in enumerate(frames):
        np.testing.assert_array_equal(results[i], reference.infer(obs, noise).actions)
