"""Latency-first or throughput pipelining (runtime/pipelining.py): the chooser on fake arrival and service
times, and the executor holding one frame on the device at a time when latency first."""

from __future__ import annotations

import threading

import pytest
from vla_runtime.runtime.buffers import MAX_IN_FLIGHT
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.pipelining import WINDOW, PipeliningChooser

from ..conftest import random_observation


def feed(chooser: PipeliningChooser, interval_s: float, service_s: float, frames: int, start: float = 0.0):
    for i in range(frames):
        chooser.arrived(start + i * interval_s)
        chooser.served(service_s)
    return start + frames * interval_s


def test_auto_stays_latency_first_while_frames_arrive_slower_than_they_take():
    chooser = PipeliningChooser("auto", MAX_IN_FLIGHT)
    feed(chooser, interval_s=0.050, service_s=0.015, frames=3 * WINDOW)  # a 20 Hz robot, 15 ms frames
    assert chooser.mode == "latency" and chooser.in_flight_limit() == 1
    assert chooser.counters == {"to_latency": 0, "to_throughput": 0}


def test_auto_turns_to_throughput_when_frames_arrive_faster_and_back_when_they_slow():
    chooser = PipeliningChooser("auto", MAX_IN_FLIGHT)
    at = feed(chooser, interval_s=0.050, service_s=0.015, frames=WINDOW)
    at = feed(chooser, interval_s=0.008, service_s=0.015, frames=WINDOW, start=at)  # a burst
    assert chooser.mode == "throughput" and chooser.in_flight_limit() == MAX_IN_FLIGHT
    feed(chooser, interval_s=0.050, service_s=0.015, frames=WINDOW, start=at)
    assert chooser.mode == "latency"
    assert chooser.counters == {"to_latency": 1, "to_throughput": 1}


def test_auto_does_not_flap_around_the_threshold():
    """Arrivals alternating a little either side of the service time (within the margin) and one odd slow
    frame: no switch at all."""
    chooser = PipeliningChooser("auto", MAX_IN_FLIGHT)
    at = 0.0
    for i in range(5 * WINDOW):
        at += 0.0155 if i % 2 else 0.0145
        chooser.arrived(at)
        chooser.served(0.100 if i == 3 * WINDOW else 0.015)
    assert chooser.counters == {"to_latency": 0, "to_throughput": 0}


@pytest.mark.parametrize("setting", ["latency", "throughput"])
def test_a_fixed_setting_never_changes(setting):
    chooser = PipeliningChooser(setting, MAX_IN_FLIGHT)
    feed(chooser, interval_s=0.001, service_s=0.015, frames=2 * WINDOW)
    feed(chooser, interval_s=0.100, service_s=0.015, frames=2 * WINDOW, start=1.0)
    assert chooser.mode == setting and sum(chooser.counters.values()) == 0


def test_a_bad_setting_is_named():
    with pytest.raises(ValueError, match="pipelining: must be one of auto, latency, throughput"):
        RuntimeConfig(pipelining="fastest")


def test_latency_first_keeps_one_frame_on_the_device_and_the_next_waits(rng):
    """The first frame's completion is held: the second stays pending (not issued beside it), then runs."""
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", pipelining="latency")) as executor:
        finish, release = executor._finish, threading.Event()
        executor._finish = lambda frame: (release.wait(60), finish(frame))[1]
        try:
            first = executor.submit(random_observation(rng, "pi05_tiny"))
            with executor._cond:
                assert executor._cond.wait_for(lambda: executor._in_flight == 1, 60)
            second = executor.submit(random_observation(rng, "pi05_tiny"))
            assert not executor.wait_for_room(timeout=0.2)  # the one frame allowed is on the device
            with executor._cond:
                assert executor._in_flight == 1 and executor._pending is not None
            release.set()
            assert first.result(60).actions.shape and second.result(60).actions.shape
        finally:
            release.set()
            executor._finish = finish
        report = executor.report()["pipelining"]
    assert report == {"setting": "latency", "mode": "latency", "to_latency": 0, "to_throughput": 0,
                      "peak_in_flight": 1}  # fmt: skip


def test_the_executor_feeds_auto_each_observation_and_each_served_frame(rng):
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", pipelining="auto")) as executor:
        for _ in range(5):
            executor.infer(random_observation(rng, "pi05_tiny"))
        chooser = executor._pipelining
        assert len(chooser._arrivals) == 5 and len(chooser._service_s) == 5
        assert all(s > 0 for s in chooser._service_s)
