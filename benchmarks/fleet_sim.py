"""The multi-robot server against a simulated device: how much of a fleet's tail its queueing explains.

The real PolicyServer (its batching rule, deadline order, cap and hold) and fleet_bench's robots at 20 Hz
(`drive`: phases spread over the period, or in step), with the executor replaced by `SimulatedDevice`: a
frame of n observations occupies the device for the device time of n's batch profile, one frame at a time
(pipelining `latency`), and its chunks carry no actions. The device times are models: the H200's as the
server measured them (LIBERO-shaped, every FP8 option, 10 steps, docs/many_robots.md), the same with a
cheaper denoising loop, and none at all (what this host's threads add by themselves).

What it answers, without a GPU: whether the measured device times alone put 8 robots past 50 ms, and
what a cheaper batch would buy. `--stops MS,EVERY_S` adds stops of the whole process, as the H200's
traces showed them (ProcessStops). What it leaves out: the GPU's own jitter, the host work of a real frame
(images, copies, graph launches), and two frames overlapping on the device.

python benchmarks/fleet_sim.py OUT.json [--robots 6,8,10] [--seconds 10] [--models h200] [--trace]
    [--modes batched_in_step] [--stops 15,20]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fleet_bench import DEADLINE_S, drive, traced
from results_doc import run_header, save
from vla_runtime.runtime.collector import freeze_long_lived
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import ExecutorClosed
from vla_runtime.runtime.server import PolicyServer
from vla_runtime.runtime.types import ActionChunk

# Device ms per batch profile. "h200": medians the server measured on the H200 (14d29f4 and 93a9a9a,
# LIBERO-shaped at a horizon of 10, every FP8 option, 10 steps): about 10.5 ms a batch plus 3.5 ms a
# robot. "loop_4ms": the same with the denoising loop at issue 16's target of 4 ms instead of 7 (3 ms
# less per batch). "h200_2_steps": the H200 at 2 steps (one GPU of the adaptive run, 14d29f4). "none": no
# device time.
DEVICE_MODELS = {
    "h200": {1: 14.0, 2: 17.5, 4: 24.2, 8: 39.3},
    # The medians the servers measured on two H200s on 2026-12-01 (856ba8d, robots spread and in step):
    # faster than "h200" by 1.2 ms for 4 and 3.2 ms for 8.
    "h200_856ba8d": {1: 14.8, 2: 17.1, 4: 23.0, 8: 36.1},
    # An executor with a batch profile for every size (RuntimeConfig.batch_profiles: every_size), its
    # device time the line through the H200's: 10.5 ms a batch plus 3.5 ms a robot.
    "h200_every_size": {n: 10.5 + 3.5 * n for n in range(1, 9)},
    # The same through the every-size times the H200 servers measured at 5dcd33e for 1 to 4 robots
    # (13.3-13.9, 16.3-16.6, 20.0-20.2, 22.4-22.7 ms; docs/many_robots.md): 10.55 ms plus 3.05 a robot.
    # Batches of 5 to 8 in their own profiles were never measured: this extends the line to them.
    "h200_every_size_5dcd33e": {n: 10.55 + 3.05 * n for n in range(1, 9)},
    "loop_4ms": {1: 11.0, 2: 14.5, 4: 21.2, 8: 36.3},
    "h200_2_steps": {1: 11.5, 2: 12.7, 4: 18.6, 8: 34.5},
    "none": {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0},
}


# (name, the server's hold-and-cap rule on, the robots' ticks together): the server as it runs, and sending
# everything waiting at once, each with the robots' phases spread over the period and in step.
MODES = (
    ("batched", True, False),
    ("eager", False, False),
    ("batched_in_step", True, True),
    ("eager_in_step", False, True),
)


@dataclass
class SimulatedMember:
    """What the server keeps of a robot's observation: the future its chunk resolves."""

    received: float
    future: Future = field(default_factory=Future)


class SimulatedDevice:
    """The part of PipelinedExecutor the server uses, with frames that take a modelled device time."""

    def __init__(self, device_ms: dict[int, float], max_batch: int = 8):
        self.config = RuntimeConfig(preset="pi05_tiny", max_batch=max_batch)  # the noise's shape, the seed
        self.metadata = None
        self.device_ms = device_ms
        self._frames: list[tuple[list[SimulatedMember], float]] = []  # (members, submitted)
        self._on_device = 0
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="simulated-device", daemon=True)
        self._worker.start()

    def check_steps(self, steps) -> None:
        pass  # every frame takes its profile's modelled time

    def batch_profile(self, n: int) -> int:
        """The model's batch profiles are its keys: a batch runs in the smallest that holds it."""
        return min(b for b in self.device_ms if b >= n)

    def prepare(self, obs, noise=None, previous=None) -> SimulatedMember:
        return SimulatedMember(time.perf_counter())

    def batching_in_flight(self) -> int:
        return 1  # one frame at a time: the server caps, and holds spread robots only (hold_spread)

    def wait_for_room(self, timeout: float | None = None) -> bool:
        with self._cond:
            room = self._cond.wait_for(lambda: self._closed or not (self._frames or self._on_device), timeout)
            if self._closed:
                raise ExecutorClosed("simulated device closed")
            return room

    def submit_prepared(self, members: list[SimulatedMember], steps=None) -> list[Future]:
        with self._cond:
            self._frames.append((members, time.perf_counter()))
            self._cond.notify_all()
        return [m.future for m in members]

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._frames)
                if self._closed:
                    return
                members, submitted = self._frames.pop(0)
                self._on_device = 1
            started = time.perf_counter()
            device_s = self.device_ms[self.batch_profile(len(members))] / 1e3
            time.sleep(max(0.0, started + device_s - time.perf_counter()))
            done = time.perf_counter()
            with self._cond:
                self._on_device = 0
                self._cond.notify_all()
            first = min(m.received for m in members)
            timings = {
                "prepare": 0.0,
                "held_before_frame": (submitted - first) * 1e3,
                "queue_wait": (started - submitted) * 1e3,
                "device_total": device_s * 1e3,
                "total": (done - first) * 1e3,
            }
            for m in members:
                m.future.set_result(ActionChunk(np.zeros((0, 0), np.float32), 0.0, dict(timings), steps=10))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ProcessStops:
    """Stops of the whole process, as the H200's traces showed them (full garbage collections of 11-35 ms,
    a stop of 9 ms that no collection explained): while in the block, a thread holds Python's lock for
    `stop_ms` at a time, every `every_s` on average (exponential gaps, seeded), and every other thread
    waits it out. The lock is held by a loop in C (sum over a range), sized once against the clock."""

    def __init__(self, stop_ms: float, every_s: float, seed: int = 0):
        self.stop_ms, self.every_s, self.count = stop_ms, every_s, 0
        self._rng = random.Random(seed)
        started = time.perf_counter()
        sum(range(1_000_000))
        per_million_ms = (time.perf_counter() - started) * 1e3
        self._n = int(1_000_000 * stop_ms / max(per_million_ms, 1e-6))
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-stops", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self._rng.expovariate(1.0 / self.every_s)):
            sum(range(self._n))  # no bytecode runs: the lock is not handed over until it ends
            self.count += 1

    def __enter__(self) -> ProcessStops:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def run_point(
    model: str,
    robots: int,
    seconds: float,
    hold: bool,
    in_step: bool,
    trace: bool = False,
    stops: tuple[float, float] | None = None,
    server_options: dict | None = None,
) -> dict:
    """One point; `stops`: (ms, every s) of ProcessStops while the robots run; `server_options`:
    PolicyServer's keywords (weigh_misses, hold_spread)."""
    device = SimulatedDevice(DEVICE_MODELS[model])
    # as a real executor does after its captures (runtime/collector.py): else this process's imports
    # alone (torch) make full collections of 85 ms on the CI host, and they, not the server, miss
    freeze_long_lived()
    stopping = ProcessStops(*stops) if stops else nullcontext()
    try:
        server = PolicyServer(device, deadline_s=DEADLINE_S, hold=hold, **(server_options or {}))
        with server, stopping:
            submit_for = lambda i: lambda obs, steps: server.submit(f"r{i}", obs, steps=steps)  # noqa: E731
            before = {}
            with traced(server) if trace else nullcontext() as explain:
                row = drive(
                    submit_for,
                    robots,
                    seconds,
                    [None],
                    in_step=in_step,
                    at_measure_start=lambda: before.update(sizes=server.batch_sizes()),
                    explain_late=explain,
                )
            sizes = server.batch_sizes() - before["sizes"]
            row["batch_sizes"] = {str(n): sizes[n] for n in sorted(sizes)}
            if stops:
                row["process_stops"] = {"ms": stops[0], "every_s": stops[1], "count": stopping.count}
    finally:
        device.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--robots", default="6,8,10")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--models", default=",".join(DEVICE_MODELS))
    parser.add_argument("--trace", action="store_true", help="the server's decisions around late chunks")
    parser.add_argument(
        "--stops",
        default="",
        help="MS,EVERY_S: the whole process stopped for MS every EVERY_S on average (as on the H200)",
    )
    parser.add_argument("--modes", default=",".join(m for m, _, _ in MODES))
    parser.add_argument("--weigh-misses", action="store_true", help="the server's gather weighs misses")
    parser.add_argument(
        "--no-hold-spread",
        dest="hold_spread",
        action="store_false",
        help="spread robots' batches not held for company (the server before 2026-12-01)",
    )
    args = parser.parse_args()
    stops = tuple(float(x) for x in args.stops.split(",")) if args.stops else None
    if stops is not None and (len(stops) != 2 or not all(x > 0 for x in stops)):
        parser.error(f"--stops: MS,EVERY_S, both positive, got {args.stops!r}")
    doc = {
        **run_header(),
        "workload": "simulated device (benchmarks/fleet_sim.py), one frame at a time, 20 Hz per robot, "
        f"deadline {DEADLINE_S * 1e3:.0f} ms",
        "device_models_ms": {m: DEVICE_MODELS[m] for m in args.models.split(",")},
        "weigh_misses": args.weigh_misses,
        "hold_spread": args.hold_spread,
        "rows": [],
    }
    for model in args.models.split(","):
        for robots in (int(r) for r in args.robots.split(",")):
            for mode, hold, in_step in MODES:
                if mode not in args.modes.split(","):
                    continue
                row = {
                    "precision": model,
                    "mode": mode,
                    **run_point(
                        model,
                        robots,
                        args.seconds,
                        hold,
                        in_step,
                        args.trace,
                        stops,
                        {"weigh_misses": args.weigh_misses, "hold_spread": args.hold_spread},
                    ),
                }
                print(
                    {k: row[k] for k in ("precision", "mode", "robots", "worst_p99_ms", "p50_ms", "misses")}
                )
                doc["rows"].append(row)
                save(doc, args.out)


if __name__ == "__main__":
    main()
