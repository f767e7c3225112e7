"""The pipelined executor on the CPU: same results as the eager reference, ordering, slot reuse, newest-wins
dropping, futures and errors. (Streams, graphs and overlap are checked on a GPU in tests/gpu.)"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from vla_runtime.runtime.buffers import HOST_RING, PIPELINE_SLOTS, ShapeProfile
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import FrameDropped, PipelinedExecutor
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


def test_matches_reference_over_changing_frames_with_drops(pair, rng):
    """120 frames submitted faster than served: every delivered chunk equals the reference on its own
    inputs and noise (bit-exact on the CPU: the same kernels run in the same order), and every frame is
    either delivered or reported dropped."""
    executor, reference = pair
    cfg = executor.config.model
    frames = [(random_observation(rng, executor.config.preset), noise_for(cfg, rng)) for _ in range(120)]
    before = dict(executor.counters)
    futures = [executor.submit(obs, noise) for obs, noise in frames]
    delivered = dropped = 0
    for (obs, noise), future in zip(frames, futures, strict=True):
        try:
            chunk = future.result(timeout=60)
        except FrameDropped:
            dropped += 1
            continue
        delivered += 1
        assert chunk.timestamp == obs.timestamp
        np.testing.assert_array_equal(chunk.actions, reference.infer(obs, noise).actions)
    assert delivered + dropped == 120 and delivered >= 2 and dropped >= 1
    assert executor.counters["dropped"] - before["dropped"] == dropped
    assert executor.counters["completed"] - before["completed"] == delivered
    assert futures[-1].exception() is None  # the newest frame always wins


def test_sequential_frames_alternate_slots_and_reuse_buffers(pair, rng):
    executor, _ = pair
    runner: StageRunner = executor._runners[executor.default_profile()]
    kv_ptrs = [slot.kv_cache.data_ptr() for slot in runner.buffers.device_slots]
    seen_slots = []
    original = runner.run

    def spy(stage, slot):
        if stage == "prefix":
            seen_slots.append(slot)
        return original(stage, slot)

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
    assert PIPELINE_SLOTS == 2 and HOST_RING > PIPELINE_SLOTS


def test_results_arrive_in_submission_order_with_timings(pair, rng):
    executor, _ = pair
    order = []
    futures = []
    for i in range(5):
        f = executor.submit(random_observation(rng, executor.config.preset))
        f.add_done_callback(lambda fut, i=i: order.append(i))
        futures.append(f)
        executor.wait_idle()
    chunks = [f.result() for f in futures]
    assert order == list(range(5))
    for chunk in chunks:
        assert {"copy_in", "vision", "prefix", "denoise", "copy_out", "queue_wait", "total"} <= set(
            chunk.timings_ms
        )
        assert all(v >= 0 for v in chunk.timings_ms.values())
    report = executor.report()
    assert report["latency_ms"]["denoise"]["n"] >= 5 and report["counters"]["submitted"] >= 5


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
    assert three.steps == 3 and ShapeProfile(3, executor.config.model.max_token_len, 3) in executor._runners
    reference3 = EagerPolicy(parts=executor.parts)
    reference3.steps, reference3.times, reference3.dt = 3, *_schedule(3)
    np.testing.assert_array_equal(three.actions, reference3.infer(obs, noise).actions)


def _schedule(steps):
    import torch
    from vla_runtime.graphs.pi0 import time_schedule

    times, dt = time_schedule(steps)
    return torch.from_numpy(times), dt


def test_trace_has_every_stage_lane(pair, rng):
    executor, _ = pair
    for _ in range(3):
        executor.infer(random_observation(rng, executor.config.preset))
    trace = executor.trace.to_chrome()
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"copy_in", "vision", "prefix", "denoise", "copy_out"} <= lanes
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] >= 0 for e in spans)


def _wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.01)
    return predicate()


def test_reset_and_close_resolve_every_future(rng):
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"))
    gate = threading.Event()
    runner = executor._runners[executor.default_profile()]
    original = runner.run
    runner.run = lambda stage, slot: (gate.wait(10), original(stage, slot))  # hold the device busy
    futures = [executor.submit(random_observation(rng))]
    assert _wait_until(lambda: executor._pending is None, 10)  # frame 0 is on the (held) device
    futures += [executor.submit(random_observation(rng)) for _ in range(7)]
    time.sleep(0.2)
    resetter = threading.Thread(target=executor.reset)
    resetter.start()
    time.sleep(0.2)
    gate.set()
    resetter.join(30)
    late = executor.submit(random_observation(rng))
    assert late.result(timeout=30).actions.shape == (10, 7)
    executor.close()
    assert futures[0].result().actions.shape == (10, 7)  # it was already on the device
    for f in futures[1:]:
        assert isinstance(f.exception(), FrameDropped)  # replaced by a newer frame, or by the reset
    assert "reset" in str(futures[-1].exception())
    assert executor.counters["dropped"] == 7 and executor.counters["completed"] == 2
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(random_observation(rng))


def test_an_external_stage_engine_serves_a_stage(rng):
    """The seam: an engine that reads and writes the slot's tensors can replace a stage (here a stand-in
    that runs the model's own vision code and counts its calls)."""
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny"))
    runner = executor._runners[executor.default_profile()]
    calls = []
    default = runner.engines["vision"]
    runner.engines["vision"] = lambda slot: (calls.append(slot), default(slot))
    reference = EagerPolicy(parts=executor.parts)
    obs = random_observation(rng)
    noise = rng.standard_normal((10, 8), dtype=np.float32)
    try:
        np.testing.assert_array_equal(executor.infer(obs, noise).actions, reference.infer(obs, noise).actions)
    finally:
        executor.close()
    assert len(calls) == 1 and calls[0] in runner.buffers.device_slots
