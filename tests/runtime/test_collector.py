"""runtime/collector.py. Freezing: garbage frozen with an executor is freed when it closes, and what the
executors still alive keep is frozen again. Full garbage collections taken over by the executor
(garbage_collection "while_device_busy"), on a fake clock and a recording collect: CPython's own full
collections off while any executor holds the takeover and back after the last lets go; one collection
at most a period, only where the device stays busy for twice the last pause, and past the overdue
limit whatever the frame."""

from __future__ import annotations

import gc
import sys
import threading
import time
import types
import weakref

import numpy as np
import pytest
from vla_runtime.runtime import collector
from vla_runtime.runtime import config as config_module
from vla_runtime.runtime.collector import FIRST_PAUSE_S, IDLE_S, NEVER, OVERDUE_S, PERIOD_S, WhileDeviceBusy
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor

from ..conftest import random_observation


class FakeTime:
    """A clock, and a collect that takes `pause` seconds of it."""

    def __init__(self):
        self.now, self.pause, self.collected = 1000.0, 0.012, []

    def clock(self) -> float:
        return self.now

    def collect(self, generation: int) -> int:
        self.collected.append((self.now, generation))
        self.now += self.pause
        return 0


def test_cpythons_full_collections_are_off_while_any_executor_holds_the_takeover():
    before = gc.get_threshold()
    first, second = WhileDeviceBusy(), WhileDeviceBusy()
    try:
        assert gc.get_threshold() == (before[0], before[1], NEVER)
        first.close()
        first.close()  # twice: nothing more
        assert gc.get_threshold()[2] == NEVER  # the second still holds it
    finally:
        first.close()
        second.close()
    assert gc.get_threshold() == before


def test_a_collection_runs_after_a_frame_only_when_due_and_fitting():
    t = FakeTime()
    busy = WhileDeviceBusy(t.clock, t.collect)
    try:
        assert not busy.after_issue(0.035)  # a period has not passed since the takeover
        t.now += PERIOD_S
        assert not busy.after_issue(None)  # the profile's device time not measured yet
        assert not busy.after_issue(2 * FIRST_PAUSE_S - 0.001)  # the assumed pause does not fit
        assert busy.after_issue(2 * FIRST_PAUSE_S)
        assert t.collected == [(1000.0 + PERIOD_S, 2)] and busy.collections == 1
        t.now += PERIOD_S - 0.001
        assert not busy.after_issue(1.0)  # at most one a period
        t.now += 0.001
        assert not busy.after_issue(0.020)  # the measured pause (12 ms) needs 24 ms of device
        assert busy.after_issue(0.024)
        t.now += OVERDUE_S
        assert busy.after_issue(0.001)  # overdue: whatever the frame
        assert busy.collections == 3
    finally:
        busy.close()


def test_a_collection_runs_once_every_executor_is_idle_then_once_an_overdue_time():
    t = FakeTime()
    busy = WhileDeviceBusy(t.clock, t.collect)
    try:
        t.now += PERIOD_S
        busy.active()  # a frame just now
        assert not busy.when_idle()
        t.now += IDLE_S - 0.001
        assert not busy.when_idle()  # not idle long enough
        t.now += 0.001
        assert busy.when_idle() and busy.collections == 1
        t.now += OVERDUE_S - 0.001
        assert not busy.when_idle()  # one per idle spell, then one per overdue time
        t.now += 0.001
        assert busy.when_idle()
        t.now += 0.1
        busy.active()  # served again, then idle again: a period after the last, one more
        t.now += PERIOD_S
        assert busy.when_idle() and busy.collections == 3
        other = WhileDeviceBusy(t.clock, t.collect)  # another executor's frame: nobody is idle
        t.now += OVERDUE_S
        other.active()
        assert not busy.when_idle()
        other.close()
    finally:
        busy.close()
    t.now += OVERDUE_S
    assert not busy.when_idle()  # closed: no more


def test_a_finalizer_that_closes_an_executor_during_a_collection_does_not_deadlock():
    """gc.collect may run finalizers; one that closes an executor takes the takeover's lock."""
    t = FakeTime()
    busy, other = WhileDeviceBusy(t.clock, t.collect), WhileDeviceBusy(t.clock, t.collect)
    t.collect = lambda generation: other.close()  # noqa: ARG005 - the finalizer, inside the collection
    busy._collect = t.collect
    try:
        t.now += OVERDUE_S
        issued = threading.Thread(target=busy.after_issue, args=(0.1,), daemon=True)
        issued.start()
        issued.join(timeout=30)
        assert not issued.is_alive() and busy.collections == 1  # the lock was free during the collection
    finally:
        busy.close()
        other.close()


def test_the_watchdog_collects_once_the_executor_is_idle(rng):
    """pi05_tiny on the CPU given a takeover on a fake clock (its watchdog looking every 250 ms): a frame
    served, then the clock moved past the idle time and a period: the watchdog runs one collection."""
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", device_timeout_s=1.0))
    t = FakeTime()
    try:
        executor.garbage_collector = WhileDeviceBusy(t.clock, t.collect)
        t.now += 0.1  # the frame comes after the takeover
        assert np.isfinite(executor.submit(random_observation(rng)).result(timeout=120).actions).all()
        executor.wait_idle()
        assert t.collected == []
        t.now += PERIOD_S + IDLE_S
        for _ in range(600):  # up to a minute of the watchdog's looks, on a starved CI machine
            if t.collected:
                break
            time.sleep(0.1)
        assert t.collected == [(1000.1 + PERIOD_S + IDLE_S, 2)]
    finally:
        executor.close()


def test_the_dispatcher_collects_after_putting_a_frame_alone_on_the_device(rng, monkeypatch):
    """The hook: pi05_tiny on the CPU (where the executor does not take over by itself: a frame is
    computed while it is issued) given a takeover with a recording collect and no waiting period: once
    its profile's time is measured, a full collection follows a frame's issue."""
    monkeypatch.setattr(collector, "PERIOD_S", 0.0)
    monkeypatch.setattr(collector, "FIRST_PAUSE_S", 0.0)
    executor = PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", garbage_collection="while_device_busy"))
    collected = []
    try:
        assert executor.garbage_collector is None  # the CPU: no takeover of its own
        executor.garbage_collector = WhileDeviceBusy(
            collect=lambda generation: collected.append((threading.current_thread().name, generation))
        )
        for _ in range(3):
            chunk = executor.submit(random_observation(rng)).result(timeout=120)
            assert np.isfinite(chunk.actions).all()
            executor.wait_idle()
        assert ("vla-dispatch", 2) in collected  # the dispatcher's, after an issue
    finally:
        executor.close()  # lets go of the takeover too


def test_an_unknown_mode_or_a_python_without_the_threshold_is_refused_naming_the_field(monkeypatch):
    with pytest.raises(ValueError, match="garbage_collection"):
        RuntimeConfig(preset="pi05_tiny", garbage_collection="sometimes")
    monkeypatch.setattr(config_module, "generational_thresholds", lambda: False)  # 3.14, free-threaded
    with pytest.raises(ValueError, match="garbage_collection: while_device_busy needs CPython"):
        RuntimeConfig(preset="pi05_tiny", garbage_collection="while_device_busy")


def test_the_default_is_the_executors_collections_where_the_interpreter_allows_them(monkeypatch):
    # 3.11-3.13 with the GIL (CI's 3.12): the executor's; 3.14 and free-threaded builds: CPython's own
    want = "while_device_busy" if collector.generational_thresholds() else "automatic"
    assert RuntimeConfig(preset="pi05_tiny").garbage_collection == want
    later = types.SimpleNamespace(implementation=sys.implementation, version_info=(3, 14, 0))
    monkeypatch.setattr(collector, "sys", later)
    assert collector.default_garbage_collection() == "automatic"


class Node:
    """An object the cyclic collector tracks."""


def test_garbage_frozen_with_an_executor_is_freed_when_it_closes_and_the_others_stay_frozen():
    started = 0
    try:
        for _ in range(2):  # one executor, and another still alive after the first closes
            collector.executor_started()
            started += 1
        node = Node()
        node.itself = node  # a cycle: freed by the cyclic collector only
        gone = weakref.ref(node)
        collector.freeze_long_lived(collect=False)
        del node
        gc.collect()
        assert gone() is not None  # frozen: never scanned
        collector.executor_closed()
        started -= 1
        assert gone() is None  # thawed and collected
        assert gc.get_freeze_count() > 0  # the live one's objects frozen again
    finally:
        for _ in range(started):
            collector.executor_closed()


def test_freezing_collects_first():
    """Garbage of the moment is not kept for good by a start-up's freeze."""
    node = Node()
    node.itself = node
    gone = weakref.ref(node)
    del node
    collector.freeze_long_lived()
    assert gone() is None
