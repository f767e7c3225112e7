"""The multi-robot server on the CPU: every robot's chunk equals its own eager result, newest wins per
robot, earliest deadline first when more robots wait than a batch holds, nobody starved, bad input goes
back to its robot only. Ordering is made deterministic by holding the device, never by sleeping."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
from vla_runtime.runtime import batching
from vla_runtime.runtime.batching import GATHER_S
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import DeviceHung, ExecutorClosed, PipelinedExecutor
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.policy import FrameDropped
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.server import PolicyServer

from ..conftest import random_observation
from .test_executor import HeldStages, until


@pytest.fixture(scope="module")
def served():
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=2))
    with PipelinedExecutor(parts=parts) as executor:
        yield executor, EagerPolicy(parts=parts)


def wait_until(executor, predicate):
    with executor._cond:
        assert executor._cond.wait_for(predicate, 30)


def fill_the_executor(server, executor, rng) -> None:
    """With the device held: one frame on it and one waiting in the executor (robots "filler_*"), so what
    robots submit next waits in the server."""
    server.submit("filler_1", random_observation(rng, "pi05_tiny"))
    wait_until(executor, lambda: executor._pending is None and executor._in_flight == 1)
    server.submit("filler_2", random_observation(rng, "pi05_tiny"))
    wait_until(executor, lambda: executor._pending is not None)


def noise_for(executor, rng):
    cfg = executor.config.model
    return rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)


def test_every_robot_gets_its_own_chunks(served, rng):
    executor, reference = served
    with PolicyServer(executor) as server:
        asks = []
        for k in range(12):
            robot = f"arm_{k % 4}"
            obs, noise = random_observation(rng, "pi05_tiny"), noise_for(executor, rng)
            asks.append((robot, obs, noise, server.submit(robot, obs, noise=noise)))
        served_chunks = 0
        for _robot, obs, noise, future in asks:
            try:
                chunk = future.result(timeout=120)
            except FrameDropped:
                continue  # a newer observation of the same robot came first
            served_chunks += 1
            np.testing.assert_allclose(
                chunk.actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5
            )
        figures = server.figures()
    assert served_chunks >= 4 and set(figures) == {f"arm_{i}" for i in range(4)}
    for robot, f in figures.items():
        assert f["submitted"] == 3 and f["completed"] + f["replaced"] == 3 and f["completed"] >= 1, robot
    assert sum(f["completed"] for f in figures.values()) == served_chunks


def test_newest_wins_per_robot_and_earliest_deadline_first(served, rng):
    """The device is held with one frame on it and one waiting in the executor; meanwhile arm_a submits
    three times (the first two are replaced) and five robots with different deadlines wait. Released, the
    next frames take them two at a time in deadline order."""
    executor, _ = served
    held = HeldStages(executor)
    try:
        with PolicyServer(executor) as server:
            fill_the_executor(server, executor, rng)
            firsts = [
                server.submit("arm_a", random_observation(rng, "pi05_tiny"), deadline_s=9.0) for _ in range(3)
            ]
            deadlines = {"r0": 5.0, "r1": 1.0, "r2": 4.0, "r3": 2.0, "r4": 3.0}
            late = {
                r: server.submit(r, random_observation(rng, "pi05_tiny"), deadline_s=d)
                for r, d in deadlines.items()
            }
            for f in firsts[:2]:
                with pytest.raises(FrameDropped, match="arm_a: replaced"):
                    f.result(timeout=5)
            held.release()
            for f in [firsts[2], *late.values()]:
                assert f.result(timeout=120).actions.shape[0] > 0
            batches = [b for b in server.batches if not b[0].startswith("filler")]
            figures = server.figures()
    finally:
        held.restore()
    assert batches == [["r1", "r3"], ["r4", "r2"], ["r0", "arm_a"]]
    assert figures["arm_a"]["replaced"] == 2 and figures["arm_a"]["completed"] == 1


def test_nobody_is_starved_under_overload(served, rng):
    """Six robots keep submitting as fast as their chunks come back, on a server that batches two: every
    robot's chunks keep coming (earliest deadline first rotates the batch)."""
    executor, _ = served
    observations = [random_observation(rng, "pi05_tiny") for _ in range(6)]
    with PolicyServer(executor) as server:
        stop = threading.Event()

        def robot(i):
            while not stop.is_set():
                try:
                    server.submit(f"r{i}", observations[i]).result(timeout=120)
                except FrameDropped:
                    pass

        threads = [threading.Thread(target=robot, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        with server._cond:  # until every robot has had 5 chunks
            ok = server._cond.wait_for(
                lambda: (
                    len(server.counters) == 6 and min(c["completed"] for c in server.counters.values()) >= 5
                ),
                300,
            )
        stop.set()
        for t in threads:
            t.join(120)
    assert ok, server.figures()
    assert max(len(b) for b in server.batches) == 2


def test_bad_input_goes_back_to_its_robot_only(served, rng):
    executor, _ = served
    with PolicyServer(executor) as server:
        bad = random_observation(rng, "pi05_tiny")
        bad.images = {"nope": bad.images[next(iter(bad.images))]}
        with pytest.raises(ValueError, match="images: unknown camera"):
            server.submit("arm_bad", bad)
        good = server.submit("arm_good", random_observation(rng, "pi05_tiny"))
        assert good.result(timeout=120).actions.shape[0] > 0
        assert "arm_bad" not in server.figures()


def test_an_executor_closed_under_the_server_fails_what_waits():
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=2))
    executor = PipelinedExecutor(parts=parts)
    server = PolicyServer(executor)
    held = HeldStages(executor)
    rng = np.random.default_rng()
    try:
        server.submit("a", random_observation(rng, "pi05_tiny"))
        wait_until(executor, lambda: executor._pending is None and executor._in_flight == 1)
        server.submit("b", random_observation(rng, "pi05_tiny"))
        wait_until(executor, lambda: executor._pending is not None)
        waiting = server.submit("c", random_observation(rng, "pi05_tiny"))  # stays in the server
        held.release()
        executor.close()
        with pytest.raises(ExecutorClosed):
            waiting.result(timeout=30)
        with pytest.raises(ExecutorClosed):
            server.submit("c", random_observation(rng, "pi05_tiny"))
    finally:
        held.restore()
        server.close()
        executor.close()


def test_a_replaced_observation_keeps_its_deadline(served, rng):
    """A robot that submits again keeps its place in the deadline order."""
    executor, _ = served
    held = HeldStages(executor)
    try:
        with PolicyServer(executor) as server:
            server.submit("filler_1", random_observation(rng, "pi05_tiny"))
            wait_until(executor, lambda: executor._pending is None and executor._in_flight == 1)
            server.submit("filler_2", random_observation(rng, "pi05_tiny"))
            wait_until(executor, lambda: executor._pending is not None)
            server.submit("often", random_observation(rng, "pi05_tiny"), deadline_s=1.0)
            others = [
                server.submit(f"o{i}", random_observation(rng, "pi05_tiny"), deadline_s=2.0) for i in range(3)
            ]
            last = server.submit("often", random_observation(rng, "pi05_tiny"), deadline_s=9.0)
            held.release()
            for f in [last, *others]:
                f.result(timeout=120)
            batches = [b for b in server.batches if not b[0].startswith("filler")]
    finally:
        held.restore()
    assert batches[0][0] == "often"  # its first deadline (1 s) still leads, not the replacement's 9 s


def test_each_robot_repeats_its_actions_whatever_the_order_of_the_robots(served, rng):
    """The noise comes from a generator per robot (the configuration's seed and the robot's name): two
    servers, the robots submitting in opposite orders, give each robot the same actions."""
    executor, _ = served
    same = random_observation(rng, "pi05_tiny")  # one observation for both: only their noise differs
    observations = {"arm_x": same, "arm_y": same}
    runs = []
    for order in (("arm_x", "arm_y"), ("arm_y", "arm_x")):
        with PolicyServer(executor) as server:
            runs.append({r: server.submit(r, observations[r]).result(timeout=120).actions for r in order})
    for robot in observations:
        np.testing.assert_allclose(runs[0][robot], runs[1][robot], rtol=1e-5, atol=1e-6)
    assert not np.allclose(runs[0]["arm_x"], runs[0]["arm_y"])  # each robot has noise of its own


def test_a_batch_runs_at_the_fewest_steps_its_robots_asked_for(served, rng):
    """Held device, then arm_a asks for 3 steps and arm_b for none (the configured 10): released, they
    go as one frame made with 3 steps, each equal to its own eager 3-step result; a robot alone asking for
    nothing gets the configured steps; steps out of range go back to the robot that asked."""
    executor, reference = served
    held = HeldStages(executor)
    try:
        with PolicyServer(executor) as server:
            fill_the_executor(server, executor, rng)
            asks = {}
            for robot, steps in (("arm_a", 3), ("arm_b", None)):
                obs, noise = random_observation(rng, "pi05_tiny"), noise_for(executor, rng)
                asks[robot] = (obs, noise, server.submit(robot, obs, noise=noise, steps=steps))
            for bad, message in ((11, "must be in 1..10"), (0, "must be in 1..10"), (True, "a whole number")):
                with pytest.raises(ValueError, match=f"steps: {message}"):
                    server.submit("arm_c", random_observation(rng, "pi05_tiny"), steps=bad)
            held.release()
            parts = executor.parts
            reference3 = EagerPolicy(
                parts=type(parts)(**{**vars(parts), "config": parts.config.replace(steps=3)})
            )
            for obs, noise, future in asks.values():
                chunk = future.result(timeout=120)
                assert chunk.steps == 3
                want = reference3.infer(obs, noise).actions
                np.testing.assert_allclose(chunk.actions, want, rtol=1e-4, atol=1e-5)
            alone = server.submit("arm_b", random_observation(rng, "pi05_tiny")).result(timeout=120)
            batches = [b for b in server.batches if not b[0].startswith("filler")]
    finally:
        held.restore()
    assert sorted(batches[0]) == ["arm_a", "arm_b"]
    assert alone.steps == executor.config.denoising_steps
    assert "arm_c" not in server.figures()  # refused before it was queued


def slow_device(server: PolicyServer, robots=("arm_a", "arm_b")) -> None:
    """The server has measured a batch of 1 at 5 s and one of 2 at 6 s, and `robots` submitted just now:
    any rate of robots needs company, and there is company to wait for. Their arrivals are stamped 5 s
    ahead, so that on a starved CI machine they cannot age out of the server's one-second rate window
    before the test's robots submit."""
    server.batching.issued(1, 0.0)
    server.batching.served(1, 0.0, 5.0)
    server.batching.issued(2, 10.0)
    server.batching.served(2, 10.0, 16.0)
    for k, robot in enumerate(robots):  # half a second apart: not a burst of robots ticking together
        server.batching.arrived(robot, time.monotonic() + 5.0 + 0.5 * k)


def test_under_load_a_robot_is_held_for_company_and_alone_it_goes_at_once(served, rng):
    """On a server that measured batches far slower than the robots' rate, one robot's observation waits
    for a second robot's (never past its latest start: its deadline is 30 s) and both go as one batch,
    each equal to its eager result. With hold=False the same robot goes alone."""
    executor, reference = served
    for hold, want in ((True, [["arm_a", "arm_b"]]), (False, [["arm_a"], ["arm_b"]])):
        with PolicyServer(executor, hold=hold) as server:
            slow_device(server)
            asks = []
            for robot in ("arm_a", "arm_b"):
                obs, noise = random_observation(rng, "pi05_tiny"), noise_for(executor, rng)
                asks.append((obs, noise, server.submit(robot, obs, noise=noise, deadline_s=30.0)))
                if not hold:
                    asks[-1][2].result(timeout=120)  # alone on the device before the next comes
            for obs, noise, future in asks:
                chunk = future.result(timeout=120)
                np.testing.assert_allclose(
                    chunk.actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5
                )
            assert server.batches == want
            assert server.batching.counters["held"] == int(hold)


def test_one_frame_at_a_time_a_spread_robot_is_held_for_one_on_its_way(rng):
    """The same load one frame at a time with the server's default (hold_spread): arm_b's arrivals say
    its next observation is due, so arm_a waits for it, and both go as one batch, each equal to its eager
    result."""
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=2, pipelining="latency"))
    with PipelinedExecutor(parts=parts) as executor, PolicyServer(executor) as server:
        slow_device(server)
        server.batching.arrived("arm_b", time.monotonic() + 4.0)  # with 5.5 after it: due again at 7.0
        reference = EagerPolicy(parts=parts)
        asks = []
        for robot in ("arm_a", "arm_b"):
            obs, noise = random_observation(rng, "pi05_tiny"), noise_for(executor, rng)
            asks.append((obs, noise, server.submit(robot, obs, noise=noise, deadline_s=30.0)))
        for obs, noise, future in asks:
            np.testing.assert_allclose(
                future.result(timeout=120).actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5
            )
        assert server.batches == [["arm_a", "arm_b"]]
        assert server.batching.counters["held"] == 1


def test_one_frame_at_a_time_without_hold_spread_the_server_does_not_hold(rng):
    """The load that holds arm_a for company above, on an executor that takes one frame at a time
    (pipelining latency) and a server that holds spread robots there no more (hold_spread off, as before
    2026-12-01; with it the same hold applies, tests/runtime/test_batching_hold.py): arm_a goes at once,
    alone, and equals its eager result."""
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=2, pipelining="latency"))
    with PipelinedExecutor(parts=parts) as executor, PolicyServer(executor, hold_spread=False) as server:
        slow_device(server)
        obs, noise = random_observation(rng, "pi05_tiny"), noise_for(executor, rng)
        chunk = server.submit("arm_a", obs, noise=noise, deadline_s=30.0).result(timeout=120)
        np.testing.assert_allclose(
            chunk.actions, EagerPolicy(parts=parts).infer(obs, noise).actions, rtol=1e-4, atol=1e-5
        )
        assert server.batches == [["arm_a"]]
        assert server.batching.counters["held"] == 0


@pytest.fixture(scope="module")
def served_by_four():
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", max_batch=4))
    with PipelinedExecutor(parts=parts) as executor:
        yield executor


def test_the_server_measures_what_it_serves(served_by_four, rng):
    with PolicyServer(served_by_four) as server:
        server.submit("a", random_observation(rng, "pi05_tiny")).result(timeout=120)
        # the batch's callback was added before the robot's: it has run when the robot hears
        assert list(server.batching.device_ms()) == ["1"]
        assert server.batching._in_flight == 0


def test_under_load_a_batch_takes_no_more_than_keeps_up(served_by_four, rng):
    """A batch of 2 measured at 0.1 s and of 1 at 5 s: at four robots a second, 2 keep up, so four robots
    waiting go two by two, earliest deadline first, although a batch could take four (and a batch of four,
    estimated at 0.2 s, would end after the earliest deadline)."""
    with PolicyServer(served_by_four) as server:
        server.batching.issued(1, 0.0)
        server.batching.served(1, 0.0, 5.0)
        server.batching.issued(2, 10.0)
        server.batching.served(2, 10.0, 10.1)
        with server._cond:  # all four waiting before the batcher looks (the condition's lock is reentrant)
            futures = []
            for k, robot in enumerate("abcd"):
                futures.append(
                    server.submit(robot, random_observation(rng, "pi05_tiny"), deadline_s=0.1 + 0.01 * k)
                )
                time.sleep(1.2 * GATHER_S)  # robots not ticking together: no burst to serve whole
        for future in futures:
            future.result(timeout=120)
        assert server.batches == [["a", "b"], ["c", "d"]]
        assert server.batch_sizes() == {2: 2}


def test_robots_in_step_are_served_as_one_batch_through_a_gap_in_their_arrivals(
    served_by_four, rng, monkeypatch
):
    """Two robots that ticked together for a second: a submits, b comes after a gap longer than GATHER_S
    (a thread that woke late). a's batch waits for b (the server wakes at b's arrival), and both go as one
    batch. The gather limit is widened here (to 40 ms, within their 50 ms period) so that the CI host's
    own stalls cannot split them."""
    monkeypatch.setattr(batching, "GATHER_LIMIT_S", 0.04)
    with PolicyServer(served_by_four) as server:
        now = time.monotonic()
        for k in range(19):  # ticks every 50 ms, the last 50 ms ago: both are due now
            for robot, offset in (("a", 0.0), ("b", 0.0001)):
                server.batching.arrived(robot, now - 0.95 + k * 0.05 + offset)
        a = server.submit("a", random_observation(rng, "pi05_tiny"), deadline_s=30.0)
        time.sleep(3 * GATHER_S)
        b = server.submit("b", random_observation(rng, "pi05_tiny"), deadline_s=30.0)
        a.result(timeout=120)
        b.result(timeout=120)
        assert server.batches == [["a", "b"]]
        assert server.batching.counters["gathered"] >= 1


def test_closing_the_server_fails_a_held_observation(served_by_four, rng):
    server = PolicyServer(served_by_four)
    slow_device(server)
    future = server.submit("a", random_observation(rng, "pi05_tiny"), deadline_s=60.0)  # held ~54 s
    server.close()
    with pytest.raises(ExecutorClosed):
        future.result(timeout=30)
    assert not server._batcher.is_alive() and server.batches == []


def test_a_robot_leaving_and_joining_again(served, rng):
    """Three robots; the third stops submitting while the others go on, then comes back: everyone's
    chunks equal their eager results throughout, and the counters carry on across the absence."""
    executor, reference = served
    with PolicyServer(executor) as server:

        def round_of(robots):
            asks = {}
            for robot in robots:
                obs, noise = random_observation(rng, "pi05_tiny"), noise_for(executor, rng)
                asks[robot] = (obs, noise, server.submit(robot, obs, noise=noise))
            for obs, noise, future in asks.values():
                np.testing.assert_allclose(
                    future.result(timeout=120).actions,
                    reference.infer(obs, noise).actions,
                    rtol=1e-4,
                    atol=1e-5,
                )

        round_of(("a", "b", "c"))
        for _ in range(3):
            round_of(("a", "b"))  # "c" has left
        round_of(("a", "b", "c"))  # and is back
        figures = server.figures()
    assert figures["a"]["completed"] == figures["b"]["completed"] == 5
    assert figures["c"]["submitted"] == figures["c"]["completed"] == 2
    assert all(f["failed"] == f["replaced"] == 0 for f in figures.values())


def test_serving_leaves_no_cycles_that_hold_observations(served, rng):
    """Every observation served, or replaced by a newer one, is freed by reference counting alone: nothing
    of it (its pending entry, its member, its prepared images, its futures) waits for the cyclic
    collector, whose collections stop every thread (server.Pending.member). The robots read their
    answers as the node does (exception() first)."""
    executor, _ = served
    for n in (1, 2):  # every profile's first frame served: its freeze (runtime/collector.py) is behind us
        for f in executor.submit_batch([random_observation(rng, "pi05_tiny") for _ in range(n)]):
            f.result(timeout=60)
    assert until(lambda: len(executor._profiles_served) >= 2)  # marked served after the freeze
    gc.collect()
    gc.disable()  # what the test makes stays until the collection below finds it
    try:
        with PolicyServer(executor) as server:
            futures = []
            for k in range(300):  # three robots, submitting faster than they are served: many replaced
                futures.append(server.submit(f"arm_{k % 3}", random_observation(rng, "pi05_tiny")))
            outcomes = [f.exception(timeout=60) for f in futures]
            assert sum(isinstance(e, FrameDropped) for e in outcomes) + outcomes.count(None) == 300
            assert outcomes.count(None) >= 10  # more frames than the executor remembers
            futures = outcomes = None
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = {type(o).__name__ for o in gc.garbage} & {
            "Pending",
            "Member",
            "PreparedInputs",
            "Future",
            "ActionChunk",
        }
        assert not held
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_robot_that_cancels_its_wait_leaves_the_others_served(served, rng):
    """A robot may cancel its future (a wait with a timeout, then cancel): a newer observation of it, the
    other robots' chunks and closing the server still go through (the server's resolutions of a cancelled
    future are no-ops, not errors on the batcher's thread or the robot's next submit)."""
    executor, _ = served
    held = HeldStages(executor)
    try:
        server = PolicyServer(executor, hold=False)
        fill_the_executor(server, executor, rng)
        first_a = server.submit("a", random_observation(rng, "pi05_tiny"))
        waiting_b = server.submit("b", random_observation(rng, "pi05_tiny"))
        assert first_a.cancel()
        second_a = server.submit("a", random_observation(rng, "pi05_tiny"))  # replaces the cancelled one
        assert server.counters["a"]["replaced"] == 1
        waiting_c = server.submit("c", random_observation(rng, "pi05_tiny"))
        assert waiting_c.cancel()
        server.close()  # fails what waits, the cancelled one among them
        for future in (second_a, waiting_b):
            with pytest.raises(ExecutorClosed):
                future.result(timeout=30)
        assert not server._batcher.is_alive()
    finally:
        held.restore()
        executor.wait_idle(60)


def test_a_cancelled_observation_on_the_device_still_lets_the_batch_finish(served, rng):
    executor, _ = served
    held = HeldStages(executor)
    try:
        with PolicyServer(executor, hold=False) as server:
            fill_the_executor(server, executor, rng)
            a = server.submit("a", random_observation(rng, "pi05_tiny"))
            b = server.submit("b", random_observation(rng, "pi05_tiny"))
            held.release()
            wait_until(executor, lambda: not server._pending)  # both went to the device
            a.cancel()  # too late for the frame: it is computed, its chunk goes nowhere
            assert b.result(timeout=120).actions.shape[0] > 0
            later = server.submit("a", random_observation(rng, "pi05_tiny"))
            assert later.result(timeout=120).actions.shape[0] > 0
            assert server._batcher.is_alive()
    finally:
        held.restore()


@pytest.mark.parametrize("pipelining", ["latency", "throughput"])
def test_robots_waiting_in_the_server_hear_at_once_of_a_hung_device(rng, pipelining):
    """With the device hung (a frame on it past device_timeout_s), a robot's observation fails with
    DeviceHung as a direct submit does, whether the executor keeps one frame on the device or more: it
    is not held in the server until the device answers."""
    parts = build_parts(
        RuntimeConfig(preset="pi05_tiny", max_batch=2, device_timeout_s=0.5, pipelining=pipelining)
    )
    executor = PipelinedExecutor(parts=parts)
    held = HeldStages(executor)
    server = PolicyServer(executor)
    try:
        stuck = server.submit("a", random_observation(rng, "pi05_tiny"))
        with pytest.raises(DeviceHung):
            stuck.result(timeout=30)
        assert executor.health()["state"] == "hung"
        later = server.submit("b", random_observation(rng, "pi05_tiny"))
        with pytest.raises(DeviceHung):
            later.result(timeout=10)  # the device is still held: no chunk could come before the release
        assert server.counters["b"]["failed"] == 1
    finally:
        held.restore()
        server.close()
        executor.close()


def test_a_refused_observation_takes_nothing_from_its_robots_noise(served, rng):
    """Each robot's noise comes from a generator of its own: a bad observation, refused, must not move it
    on, or the robot's later actions would depend on its mistakes."""
    executor, _ = served
    good = random_observation(rng, "pi05_tiny")
    bad = random_observation(rng, "pi05_tiny")
    bad.state = np.full_like(bad.state, np.nan)
    runs = []
    for refused_first in (False, True):
        with PolicyServer(executor) as server:
            if refused_first:
                with pytest.raises(ValueError, match="state"):
                    server.submit("arm", bad)
            runs.append(server.submit("arm", good).result(timeout=120).actions)
    np.testing.assert_array_equal(runs[0], runs[1])
