"""Robots at 20 Hz on one GPU (issue 15, item 5): the batched server against independent executors (one
per robot, each its own weights), in one run.

Each robot is a thread that submits an observation every 50 ms (their phases spread over the period) and
waits for nothing; a chunk is on time when it comes within the deadline (50 ms) of its submit. Per
point: the worst robot's p99 latency, misses (late chunks plus observations replaced before they were
computed), chunks per second, GPU memory, and where the time went (`time_ms`: for the late chunks and
those on time, the medians of the wait before the frame, the executor's queue, the device and the host
around it). Per precision the weights are built once: the batched
server's executor (batch profiles 1, 2, 4, 8, or with --batch-profiles every_size 1 to 8, captured
ahead) serves every robot count, and the
independent executors (one per robot, batch 1) share those weights: the same compute as separate copies,
less memory. Modes (--modes): batched (the server as it runs: under load it holds a batch for company,
runtime/batching.py), eager (the same server never holding: the baseline for the hold) and independent.
Then the largest robot count that a server mode held (p99 <= 50 ms, no miss) is run again, in that mode,
for --confirm-s seconds, for the first precision. The modes run in the order given at the first robot
count, reversed at the next, and so on: on the H200, at 6 LIBERO-shaped robots per GPU, the server with
and without its cap made the same decisions (no batch held, none capped) and measured a worst p99 of 54
and 45 ms, the one that ran first worse; alternating keeps such an effect from always favouring one mode.

--gpus N (N > 1): one process per GPU (CUDA_VISIBLE_DEVICES), each a server with its share of the robots
(as launch/fleet.launch.py deploys them), run at the same time; the points are merged (the worst robot
of all, misses and chunks summed). Each process then confirms the largest share it held for --confirm-s;
the processes start their confirmations together (a barrier file per process), and the merged
confirmation records how long they overlapped.

--workload libero: two cameras and a short instruction, in shape profiles (only what is present is
computed), the model as openpi's pi05_libero has it (a horizon of 10 actions, no state in the prompt);
three_views (default): every frame the full shape, pi05's horizon of 50.

--in-step: the robots' ticks fall together (robots on a shared clock, or cameras triggered together)
instead of spread over the period.

--adaptive: each robot asks for its denoising steps from a controller of its own, as its node would
(adaptive_steps); a batch runs at its members' fewest.

--pipelining latency: the executor keeps one frame on the device, so the server issues a batch only once
the one before has finished (default throughput: while it runs, the two overlapping).

python benchmarks/fleet_bench.py OUT.json [--preset pi05] [--robots 1,2,4,6,8,10,12] [--seconds 10]
    [--precisions fp8_all,fp8,bf16] [--gpus 2] [--workload three_views|libero]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: its tests package
from decision_trace import DecisionTrace  # noqa: E402
from results_doc import run_header, save  # noqa: E402
from vla_runtime.graphs.checkpoint import KNOWN_OPENPI_CONFIGS  # noqa: E402
from vla_runtime.runtime.adaptive import StepsController, steps_ladder  # noqa: E402
from vla_runtime.runtime.buffers import BATCH_PROFILE_SETS, batch_sizes  # noqa: E402
from vla_runtime.runtime.collector import GARBAGE_COLLECTION, thaw  # noqa: E402
from vla_runtime.runtime.config import GPU_PRECISION_OPTIONS, RuntimeConfig  # noqa: E402
from vla_runtime.runtime.executor import PipelinedExecutor  # noqa: E402
from vla_runtime.runtime.hazards import STEP_NAMES  # noqa: E402
from vla_runtime.runtime.loading import PolicyParts, build_parts  # noqa: E402
from vla_runtime.runtime.pipelining import PIPELINING_MODES  # noqa: E402
from vla_runtime.runtime.policy import FrameDropped  # noqa: E402
from vla_runtime.runtime.server import PolicyServer  # noqa: E402
from vla_runtime.runtime.types import Observation  # noqa: E402

from tests.conftest import random_observation  # noqa: E402

PERIOD_S = DEADLINE_S = 0.05
TOP_STEPS = 10  # the configured denoising steps (pi05's default)
PRECISIONS = {k: GPU_PRECISION_OPTIONS[k] for k in ("fp8_all", "fp8", "bf16")}  # fastest first


def where_the_time_went(spans: list[tuple[float, dict]]) -> dict:
    """Of each chunk's latency (ms) and its frame's timings: the medians of its parts, for the late chunks
    and the ones on time (computed chunks only; the medians of the parts need not add up to the median
    latency). A frame's timings count from its earliest member, so a chunk's own wait before its frame is
    its latency less the frame's part after it went to the executor."""
    parts = {"late": [], "on_time": []}
    for latency, t in spans:
        after_submit = t["total"] - t["prepare"] - t["held_before_frame"]  # from the frame's submit on
        device = t.get("device_total", sum(t.get(step, 0.0) for step in STEP_NAMES))  # CPU: its steps
        parts["late" if latency > DEADLINE_S * 1e3 else "on_time"].append(
            {
                # prepare, the wait in the server, and the delivery after the frame's end (the members'
                # callbacks run one after another, so it grows with the chunk's place in its batch)
                "before_frame": latency - after_submit,
                "executor_queue": t["queue_wait"],
                "device": device,  # with two frames in flight, shared with the other one
                "host_rest": after_submit - t["queue_wait"] - device,  # issue, slot waits, completion
            }
        )
    return {
        kind: {"chunks": len(rows), **{k: float(np.median([r[k] for r in rows])) for k in rows[0]}}
        for kind, rows in parts.items()
        if rows
    }


WARMUP_S = 2.0  # of every point: the server measures its batches' device times, the robots' periods
STRAGGLER_S = 0.005  # a robot this far behind its tick's first observation came late in the tick


def tick_arrivals(sends: dict[tuple[int, int], float], late: list[tuple[int, int]]) -> dict:
    """Robots in step: how a tick's observations spread (last less first going to `submit`, ms), and of the
    late chunks, how far each robot's observation was behind its tick's first: a straggler (more than
    STRAGGLER_S) or one that came with its tick and was late all the same (held behind a straggler's
    batch, or in a batch that went late)."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for (_, k), sent in sends.items():
        first[k] = min(first.get(k, sent), sent)
        last[k] = max(last.get(k, sent), sent)
    spreads = [(last[k] - first[k]) * 1e3 for k in first]
    offsets = sorted((sends[key] - first[key[1]]) * 1e3 for key in late if key in sends)
    return {
        "ticks": len(first),
        "spread_ms": {
            q: float(np.percentile(spreads, p)) for q, p in (("p50", 50), ("p99", 99), ("max", 100))
        },
        "ticks_spread_over_straggler_s": sum(x > STRAGGLER_S * 1e3 for x in spreads),
        "late_stragglers": sum(x > STRAGGLER_S * 1e3 for x in offsets),
        "late_with_their_tick": sum(x <= STRAGGLER_S * 1e3 for x in offsets),
        "late_offsets_ms": [round(x, 2) for x in offsets[:100]],
    }


def drive(
    submit_for,
    robots: int,
    seconds: float,
    observations,
    controllers=None,
    in_step: bool = False,
    warmup_s: float = WARMUP_S,
    at_measure_start=None,
    explain_late=None,
) -> dict:
    """`submit_for(i)(obs, steps) -> Future` per robot; every robot at 20 Hz for `warmup_s` and then
    `seconds`, with no pause between them (a fleet does not pause; after a pause of more than the server's
    one-second memory of arrivals, the first tick of robots in step finds nobody due and goes split),
    and only the ticks after the warm-up are counted. `at_measure_start()` is called 2 ms before the first
    counted tick (callers snapshot the server's counters; a batch issued about then may fall on either
    side).
    `controllers` (adaptive steps, one StepsController per robot, as a robot keeps its node's): each robot
    asks for its steps from its own, fed as the node feeds it (each chunk's age, and its oldest frame in
    flight at every new observation).
    `explain_late([(robot, sent, woke_late), ...])`, the counted late chunks in the order sent (`woke_late`:
    the send less its tick's schedule): the dict it returns
    goes into the row (`traced`: `late_traces` and `gc_pauses`)."""
    latencies: list[list[float]] = [[] for _ in range(robots)]
    misses = [0] * robots
    steps_used: list[int] = []
    spans: list[tuple[float, dict]] = []  # per chunk: its latency (ms) and its frame's timings
    sends: dict[tuple[int, int], float] = {}  # (robot, tick) -> when its observation went to submit
    woke_late: dict[tuple[int, int], float] = {}  # (robot, tick) -> its send less its tick's schedule
    late_ticks: list[tuple[int, int]] = []  # (robot, tick) of each late chunk
    adaptive = controllers is not None
    controllers = controllers or [None] * robots
    step_changes = {"steps_down": 0, "steps_up": 0}  # of the counted ticks' sends and chunks
    lock = threading.Lock()

    def counting_changes(controller, measured: bool, update, *args) -> None:
        """`update(*args)`, a method of a robot's controller; its step changes counted if the tick is."""
        before = {k: controller.counters[k] for k in step_changes}
        update(*args)
        if measured:
            with lock:
                for k in step_changes:
                    step_changes[k] += controller.counters[k] - before[k]

    def robot(i: int) -> None:
        submit, controller = submit_for(i), controllers[i]
        in_flight: dict[int, tuple[float, int]] = {}  # id(future) -> (sent, steps)
        start = t0 + (0.0 if in_step else i * PERIOD_S / robots)  # phases spread over the period, or not
        k = 0
        while True:
            tick = start + k * PERIOD_S
            # by the schedule's offsets: start + 0.2 > start + 0.1 + 0.1 for some clock values
            if k * PERIOD_S > warmup_s + seconds + 1e-9:
                return
            measured = k * PERIOD_S >= warmup_s - 1e-9  # by the schedule, not by when the thread woke
            time.sleep(max(0.0, tick - time.monotonic()))
            sent = time.monotonic()
            steps = None
            if controller is not None:
                with lock:
                    oldest = min(in_flight.values(), default=None)
                if oldest is not None:
                    counting_changes(controller, measured, controller.overdue, sent - oldest[0], oldest[1])
                steps = controller.steps

            def done(future, sent=sent, k=k, measured=measured):
                with lock:
                    in_flight.pop(id(future), None)
                # asked, not raised: a raised exception's traceback holds this frame, which holds the future,
                # which holds the exception: a cycle per dropped frame for the collector (as the node does)
                if isinstance(future.exception(), FrameDropped):
                    with lock:
                        misses[i] += measured
                    return
                chunk = future.result()
                latency = time.monotonic() - sent
                if controller is not None:
                    denoise_ms = chunk.timings_ms.get("denoise")
                    counting_changes(
                        controller, measured, controller.observe, latency, chunk.steps, denoise_ms
                    )
                if not measured:
                    return
                with lock:
                    latencies[i].append(latency * 1e3)
                    spans.append((latency * 1e3, chunk.timings_ms))
                    misses[i] += latency > DEADLINE_S
                    if latency > DEADLINE_S:
                        late_ticks.append((i, k))
                    steps_used.append(chunk.steps)

            if measured:
                with lock:
                    sends[(i, k)] = sent
                    woke_late[(i, k)] = sent - tick
            future = submit(observations[(i + k) % len(observations)], steps)
            with lock:
                in_flight[id(future)] = (sent, steps or TOP_STEPS)
            future.add_done_callback(done)
            k += 1

    t0 = time.monotonic() + 0.01  # every thread started by then
    threads = [threading.Thread(target=robot, args=(i,)) for i in range(robots)]
    for t in threads:
        t.start()
    if at_measure_start is not None:
        # Just before the first counted tick (the first whole period after the warm-up). A batch issued
        # around that moment may land on either side of the snapshot: at most one batch in its counts.
        first_counted = t0 + math.ceil(warmup_s / PERIOD_S - 1e-9) * PERIOD_S
        time.sleep(max(0.0, first_counted - 0.002 - time.monotonic()))
        at_measure_start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # the last chunks
    with lock:
        p99 = [float(np.percentile(v, 99)) if v else float("inf") for v in latencies]
        chunks = sum(len(v) for v in latencies)
        row = {
            "robots": robots,
            "worst_p99_ms": max(p99),
            "p50_ms": float(np.median([x for v in latencies for x in v])) if chunks else float("inf"),
            "misses": sum(misses),
            "chunks_per_s": chunks / seconds,
            "fewest_chunks_per_robot": min(len(v) for v in latencies),
            "chunks_by_steps": {str(n): steps_used.count(n) for n in sorted(set(steps_used))},
            "time_ms": where_the_time_went(spans),  # medians of each part, late chunks and on time
        }
        if in_step:
            row["ticks"] = tick_arrivals(sends, late_ticks)
        # how late the robots' threads sent after their tick's schedule (a stopped process shows here)
        late_ms = [x * 1e3 for x in woke_late.values()] or [0.0]
        row["woke_late_ms"] = {
            q: float(np.percentile(late_ms, p)) for q, p in (("p50", 50), ("p99", 99), ("max", 100))
        }
        if explain_late is not None:
            late = sorted(((i, sends[(i, k)], woke_late[(i, k)]) for i, k in late_ticks), key=lambda x: x[1])
            row |= explain_late(late)
    if adaptive:
        row.update(step_changes)  # in the counted ticks, not the warm-up
    return row


@contextmanager
def traced(server: PolicyServer):
    """`drive`'s explain_late for a server, while in the block: its decisions around each late chunk (robot i
    is "r{i}") and the garbage collector's pauses over the warm-up, the run and the last chunks'
    second; the collector's callback removed however the block ends."""
    with DecisionTrace(server.batching) as trace:

        def explain(late: list[tuple[int, float, float]]) -> dict:
            trace.close()
            return {
                "late_traces": trace.around([(f"r{i}", sent, woke) for i, sent, woke in late]),
                "gc_pauses": trace.gc_pauses(),
            }

        yield explain


def memory_gib() -> float:
    """The peak allocation since the last `reset_peak()`."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def with_batch(parts: PolicyParts, max_batch: int) -> PolicyParts:
    return type(parts)(**{**vars(parts), "config": parts.config.replace(max_batch=max_batch)})


class Fleet:
    """One precision's weights, its batched executor and (grown on demand) independent executors."""

    def __init__(
        self,
        config: RuntimeConfig,
        observations,
        in_step: bool = False,
        trace: bool = False,
        server_options: dict | None = None,
    ):
        self.adaptive, self.in_step, self.trace = config.adaptive_steps, in_step, trace
        self.server_options = server_options or {}  # PolicyServer's keywords (weigh_misses, hold_spread)
        self.parts = build_parts(config)
        self.weights_gib = allocated_gib()  # what stays after the build (weights and FP8 copies)
        # With shape profiles only the workload's shapes are captured (none of the full shape ahead of time):
        # each batch profile when first met, here, before the clock runs.
        ahead = [] if config.shape_profiles else None
        self.batched = PipelinedExecutor(parts=with_batch(self.parts, 8), profiles=ahead)
        ladder = steps_ladder(TOP_STEPS) if self.adaptive else (None,)
        for n in batch_sizes(8, config.batch_profiles):
            for steps in ladder:  # every rung's denoise graphs too
                for future in self.batched.submit_batch(observations[:n], steps=steps):
                    future.result(timeout=600)
        self.independent: list[PipelinedExecutor] = []

    def run_batched(self, robots: int, seconds: float, observations, hold: bool = True) -> dict:
        server = PolicyServer(self.batched, deadline_s=DEADLINE_S, hold=hold, **self.server_options)
        with server:
            submit_for = lambda i: lambda obs, steps: server.submit(f"r{i}", obs, steps=steps)  # noqa: E731
            controllers = self.controllers(robots)
            before = {}

            def snapshot():
                before.update(sizes=server.batch_sizes(), held=server.batching.counters["held"])

            with traced(server) if self.trace else nullcontext() as explain:
                row = drive(
                    submit_for,
                    robots,
                    seconds,
                    observations,
                    controllers,
                    self.in_step,
                    at_measure_start=snapshot,
                    explain_late=explain,
                )
            row["frozen_objects"] = gc.get_freeze_count()  # what the collector's full scans skip
            if self.batched.garbage_collector is not None:  # full collections run by the executor, so far
                row["executor_collections"] = self.batched.garbage_collector.collections
            sizes = server.batch_sizes() - before["sizes"]
            row["batch_sizes"] = {str(n): sizes[n] for n in sorted(sizes)}
            row["batch_device_ms"] = server.batching.device_ms()  # per batch profile, median
            row["batches_held"] = server.batching.counters["held"] - before["held"]
        return row

    def run_eager(self, robots: int, seconds: float, observations) -> dict:
        return self.run_batched(robots, seconds, observations, hold=False)

    def run_independent(self, robots: int, seconds: float, observations) -> dict:
        while len(self.independent) < robots:
            executor = PipelinedExecutor(parts=with_batch(self.parts, 1))
            for steps in steps_ladder(TOP_STEPS) if self.adaptive else (None,):
                executor.submit(observations[0], steps=steps).result(timeout=600)  # its shapes, captured
            self.independent.append(executor)
        submit_for = lambda i: lambda obs, steps: self.independent[i].submit(obs, steps=steps)  # noqa: E731
        return drive(submit_for, robots, seconds, observations, self.controllers(robots), self.in_step)

    def controllers(self, robots: int) -> list[StepsController] | None:
        """With adaptive steps, a controller per robot for a warm-up and its run (None: fixed steps)."""
        return [StepsController(TOP_STEPS, DEADLINE_S) for _ in range(robots)] if self.adaptive else None

    def close(self) -> None:
        for executor in [self.batched, *self.independent]:
            executor.close()


def three_views(preset: str) -> tuple[list[Observation], dict]:
    """Every camera at 224 x 224, a few words: every frame runs the full shape (the prompt padded)."""
    rng = np.random.default_rng(0)
    return [random_observation(rng, preset, side=224) for _ in range(8)], {}


def libero(preset: str) -> tuple[list[Observation], dict]:
    """LIBERO's inputs: two cameras (the optional one absent) and a short instruction, in shape profiles;
    the model as openpi's pi05_libero has it (a horizon of 10 actions, not pi05's 50; no state in the
    prompt)."""
    rng = np.random.default_rng(0)
    optional = RuntimeConfig(preset=preset).optional_camera_names
    observations = []
    for _ in range(8):
        # frames at the model's 224, as resized (LIBERO renders 256 since 889620c: each observed frame then
        # also costs a host resize, not modelled here, so the measured runs stay comparable)
        obs = random_observation(rng, preset, side=224, skip=optional[:1])
        text = "put the black bowl on the plate"
        observations.append(Observation(obs.images, obs.state, text, obs.timestamp))
    return observations, dict(shape_profiles=True, **KNOWN_OPENPI_CONFIGS["pi05_libero"])


WORKLOADS = {"three_views": three_views, "libero": libero}


def shown(row: dict) -> dict:
    """A row as printed: without its traces (they are in the JSON)."""
    return {k: v for k, v in row.items() if k != "late_traces"}


def held(row: dict) -> bool:
    return row["worst_p99_ms"] <= DEADLINE_S * 1e3 and row["misses"] == 0


def single_gpu(args, doc: dict) -> None:
    cuda = torch.cuda.is_available()
    observations, workload = WORKLOADS[args.workload](args.preset)
    precisions = args.precisions.split(",") if cuda else ["float32"]
    for n, precision in enumerate(precisions):
        settings = {**PRECISIONS.get(precision, {}), **workload, "adaptive_steps": args.adaptive}
        settings["pipelining"] = args.pipelining
        settings["batch_profiles"] = args.batch_profiles
        settings["garbage_collection"] = args.garbage_collection
        config = RuntimeConfig(preset=args.preset, device="cuda" if cuda else "cpu", **settings)
        server_options = {"weigh_misses": args.weigh_misses, "hold_spread": args.hold_spread}
        fleet = Fleet(config, observations, args.in_step, args.trace, server_options)
        if args.unfrozen:
            thaw()  # start-up's objects scanned by every full collection again, as before the freeze
        doc.setdefault("weights_gib", {})[precision] = fleet.weights_gib
        best_robots, best_mode = 0, "batched"  # the largest robot count a server mode held, and that mode
        runs = {"batched": fleet.run_batched, "eager": fleet.run_eager, "independent": fleet.run_independent}
        try:
            for k, robots in enumerate(int(r) for r in args.robots.split(",")):
                modes = args.modes.split(",")
                # reversed at every other count, so no mode always runs first (the order still favours
                # one mode at each count: compare counts side by side, not one alone)
                for mode in modes if k % 2 == 0 else modes[::-1]:
                    run = runs[mode]
                    if mode == "independent" and robots > args.independent_up_to:
                        continue
                    reset_peak()
                    row = {"precision": precision, "mode": mode, **run(robots, args.seconds, observations)}
                    row["peak_gib"] = memory_gib()  # this point's peak: weights, buffers, activations
                    print(json.dumps(shown(row)), flush=True)
                    doc["rows"].append(row)
                    save(doc, args.out)
                    more = robots > best_robots or (robots == best_robots and mode == "batched")
                    if mode != "independent" and held(row) and more:  # a tie: the server as it runs
                        best_robots, best_mode = robots, mode
            together = True
            if n == 0 and args.confirm_s > 0:  # also when this one confirms nothing: nobody waits for it
                together = await_siblings(args.barrier)
            if best_robots and n == 0 and args.confirm_s > 0:
                started = time.time()  # the run's warm-up included, as in every process
                confirm = runs[best_mode](best_robots, args.confirm_s, observations)
                doc["confirm"] = {
                    "precision": precision,
                    "mode": best_mode,
                    "seconds": args.confirm_s,
                    **confirm,
                }
                doc["confirm"].update(started=started, ended=time.time(), siblings_arrived=together)
                print("confirm", json.dumps(shown(doc["confirm"])), flush=True)
        finally:
            fleet.close()
            del fleet
            torch.cuda.empty_cache() if cuda else None
        save(doc, args.out)


def await_siblings(barrier: str, timeout_s: float = 300.0) -> bool:
    """`barrier` is "MINE,THEIRS,...": write mine, wait (at most `timeout_s`) until all exist; whether they
    did. Without one, True at once (a single GPU)."""
    if not barrier:
        return True
    mine, *theirs = [Path(p) for p in barrier.split(",")]
    mine.touch()
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in theirs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def merge(points: list[dict]) -> dict:
    """One robot count served by several GPUs at once: their rows as one fleet."""
    return {
        "robots": sum(p["robots"] for p in points),
        "worst_p99_ms": max(p["worst_p99_ms"] for p in points),
        "p50_ms": float(np.median([p["p50_ms"] for p in points])),
        "misses": sum(p["misses"] for p in points),
        "chunks_per_s": sum(p["chunks_per_s"] for p in points),
        "fewest_chunks_per_robot": min(p["fewest_chunks_per_robot"] for p in points),
        "per_gpu": points,
    }


def multi_gpu(args, doc: dict) -> None:
    """Robots split evenly over `args.gpus` processes, one per GPU, the server's modes only (no
    independent executors), the first precision."""
    totals = [int(r) for r in args.robots.split(",") if int(r) >= args.gpus]  # a robot on every GPU
    if not totals:
        raise SystemExit(f"--robots: no count of at least {args.gpus} (one robot per GPU)")
    children = []
    barriers = [args.out.with_name(f"{args.out.stem}-gpu{gpu}.ready") for gpu in range(args.gpus)]
    for path in barriers:
        path.unlink(missing_ok=True)
    for gpu in range(args.gpus):
        share = ",".join(str(t // args.gpus + (gpu < t % args.gpus)) for t in totals)
        path = args.out.with_name(f"{args.out.stem}-gpu{gpu}.json")
        command = [sys.executable, __file__, str(path), "--preset", args.preset, "--robots", share]
        command += ["--seconds", str(args.seconds), "--precisions", args.precisions.split(",")[0]]
        command += [
            "--independent-up-to",
            "0",
            "--confirm-s",
            str(args.confirm_s),
            "--workload",
            args.workload,
        ]
        command += ["--adaptive"] if args.adaptive else []
        command += ["--in-step"] if args.in_step else []
        command += ["--trace"] if args.trace else []
        command += ["--unfrozen"] if args.unfrozen else []
        command += ["--weigh-misses"] if args.weigh_misses else []
        command += [] if args.hold_spread else ["--no-hold-spread"]
        command += ["--garbage-collection", args.garbage_collection]
        command += ["--pipelining", args.pipelining, "--batch-profiles", args.batch_profiles]
        command += ["--modes", ",".join(m for m in args.modes.split(",") if m != "independent")]
        command += ["--barrier", ",".join(map(str, [barriers[gpu], *barriers[:gpu], *barriers[gpu + 1 :]]))]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        children.append((path, subprocess.Popen(command, env=env)))
    failed = [gpu for gpu, (_, child) in enumerate(children) if child.wait() != 0]
    if failed:
        raise SystemExit(f"the processes of GPUs {failed} failed (their output is above)")
    docs = [json.loads(path.read_text()) for path, _ in children]
    doc["gpus"] = args.gpus
    doc["devices"] = [d["device"] for d in docs]
    for points in zip(*[d["rows"] for d in docs], strict=True):
        row = {"precision": points[0]["precision"], "mode": points[0]["mode"], **merge(list(points))}
        print(json.dumps({k: v for k, v in row.items() if k != "per_gpu"}), flush=True)
        doc["rows"].append(row)
    confirms = [d["confirm"] for d in docs if "confirm" in d]
    if len(confirms) == args.gpus:  # every GPU held some share: their confirmations as one fleet
        overlap = min(c["ended"] for c in confirms) - max(c["started"] for c in confirms)
        doc["confirm"] = {"precision": confirms[0]["precision"], "seconds": args.confirm_s, **merge(confirms)}
        doc["confirm"]["modes"] = [c["mode"] for c in confirms]  # per GPU: the mode that held most there
        doc["confirm"]["overlap_s"] = overlap
        # a fleet's confirmation only if every GPU's ran at the same time, nearly all of it, in one mode
        arrived = all(c["siblings_arrived"] for c in confirms)
        one_mode = len(set(doc["confirm"]["modes"])) == 1
        doc["confirm"]["concurrent"] = arrived and one_mode and overlap >= 0.9 * (args.confirm_s + WARMUP_S)
        print("confirm", json.dumps({k: v for k, v in doc["confirm"].items() if k != "per_gpu"}), flush=True)
    save(doc, args.out)


def config_option(parser: argparse.ArgumentParser, field: str, choices, help: str) -> None:
    """--field-with-dashes for a RuntimeConfig field given in words, its default the config's."""
    flag = "--" + field.replace("_", "-")
    parser.add_argument(flag, choices=choices, default=getattr(RuntimeConfig, field), help=help)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--robots", default="1,2,4,6,8,10,12")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--independent-up-to", type=int, default=6, help="the baseline collapses past 4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--confirm-s", type=float, default=60.0)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--workload", choices=WORKLOADS, default="three_views")
    parser.add_argument("--adaptive", action="store_true", help="each robot adapts its steps (as its node)")
    parser.add_argument(
        "--in-step", action="store_true", help="every robot's tick at the same moment (a shared clock)"
    )
    config_option(
        parser,
        "pipelining",
        PIPELINING_MODES,
        "frames on the device: throughput (the server issues a batch while one runs), latency",
    )
    config_option(
        parser,
        "batch_profiles",
        BATCH_PROFILE_SETS,
        "the batched executor's profiles: powers_of_two (1, 2, 4, 8) or every_size (1 to 8)",
    )
    parser.add_argument(
        "--modes",
        default="batched,eager,independent",
        help="batched: the server as it runs (holding for company under load); eager: the server never "
        "holding; independent: one executor per robot",
    )
    parser.add_argument(
        "--trace", action="store_true", help="the server's decisions around each late chunk (late_traces)"
    )
    parser.add_argument(
        "--weigh-misses",
        action="store_true",
        help="the server's gather of a tick may outlast its first robot's latest start if fewer are late",
    )
    parser.add_argument(
        "--no-hold-spread",
        dest="hold_spread",
        action="store_false",
        help="one frame at a time, the server holds spread robots' batches for company no more (as before)",
    )
    parser.add_argument(
        "--unfrozen",
        action="store_true",
        help="thaw the objects start-up froze out of the garbage collector's scans (runtime/collector.py)",
    )
    config_option(
        parser,
        "garbage_collection",
        GARBAGE_COLLECTION,
        "Python's full collections: CPython's (automatic) or the executor's, after a frame's issue",
    )
    parser.add_argument("--barrier", default="", help=argparse.SUPPRESS)  # set by --gpus for its children
    args = parser.parse_args()
    if args.unfrozen and "independent" in args.modes.split(","):
        parser.error("--unfrozen: not with the independent mode (its executors' captures freeze again)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        **run_header(),
        "workload": f"{args.preset}, {args.workload}, 20 Hz per robot, deadline {DEADLINE_S * 1e3:.0f} ms"
        + (", adaptive steps per robot" if args.adaptive else "")
        + (", ticks in step" if args.in_step else ", ticks spread over the period"),
        "precisions": {p: PRECISIONS.get(p, "float32") for p in args.precisions.split(",")},
        "pipelining": args.pipelining,
        "batch_profiles": args.batch_profiles,
        "start_up_objects_frozen": not args.unfrozen,
        "garbage_collection": args.garbage_collection,
        "weigh_misses": args.weigh_misses,
        "hold_spread": args.hold_spread,
        "rows": [],
    }
    if args.gpus > 1:
        multi_gpu(args, doc)
    else:
        single_gpu(args, doc)


if __name__ == "__main__":
    main()
