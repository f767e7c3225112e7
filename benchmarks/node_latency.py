"""Latency where the robot feels it: a peer publishes stamped frames at 30 Hz to the policy node (its own
process, as on a robot) and records when each observation's chunk arrives; the age of a chunk is
arrival - stamp. The baseline, measured in the same run on the same frames: the engine in this process,
`submit` -> chunk (the node's work minus ROS). The difference is what the node adds.

    python3 benchmarks/node_latency.py --preset pi05_tiny --device cpu --out results.json
    python3 benchmarks/node_latency.py --preset pi05 --device cuda --precision fp8 --fp8-expert

Not a CI test (it measures time). Needs rclpy (ROS 2 Jazzy wheels) beside torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from results_doc import recorded_commit
from robot_peer import CAMERAS, INSTRUCTION, RobotPeer, frames, paced, policy_node_command


def percentiles(values) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "n": int(arr.size)}


def engine_baseline(config, data, rate_hz: float, seconds: float, warmup: int, instant: bool) -> dict:
    """The engine in this process at the same rate: submit (with image preparation) -> chunk."""
    from vla_runtime.runtime.executor import PipelinedExecutor
    from vla_runtime.runtime.policy import FrameDropped
    from vla_runtime.runtime.types import Observation

    if instant:
        from instant_policy_node import InstantPolicy as PipelinedExecutor  # noqa: N813 - the same seat
    ages, lock = [], threading.Lock()
    with PipelinedExecutor(config) as policy:
        for k in range(warmup):
            images, state = data[k % len(data)]
            policy.infer(Observation(images, state, INSTRUCTION, float(k)))

        def done(future, submitted):
            if not isinstance(future.exception(), FrameDropped):
                with lock:
                    ages.append((time.perf_counter() - submitted) * 1e3)

        for k in paced(rate_hz, seconds):
            images, state = data[k % len(data)]
            submitted = time.perf_counter()
            future = policy.submit(Observation(images, state, INSTRUCTION, time.time()))
            future.add_done_callback(lambda f, s=submitted: done(f, s))
        if not instant:
            policy.wait_idle(30)
        health = policy.health()
    return {
        "submit_to_chunk_ms": percentiles(ages),
        "engine_total_ms": {k: health["latency_ms"]["total"][k] for k in ("p50", "p99")},
        "dropped": health["counters"].get("dropped", 0),
    }


def through_the_node(args, data, rate_hz: float, seconds: float, log_path: Path) -> dict:
    """The policy node in its own process; this process is the robot."""
    params = {
        "preset": args.preset,
        "device": args.device,
        "precision": args.precision,
        "fp8_expert": str(args.fp8_expert).lower(),
        "steps": args.steps,
        "cameras": "[" + ",".join(f"'{c}'" for c in CAMERAS) + "]",
        "optional_cameras": "['right_wrist_0_rgb']",
    }
    peer = RobotPeer(data)  # first: the node inherits the ROS domain it sets
    log = open(log_path, "w")
    try:
        node = subprocess.Popen(
            policy_node_command(params, args.instant), stdout=log, stderr=subprocess.STDOUT
        )
    except OSError:
        peer.close()
        log.close()
        raise
    try:
        deadline = time.monotonic() + args.startup_timeout
        while peer.diagnostics.get("phase") != "serving":
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError(f"the node did not start serving (rc {node.poll()}); see {log_path}")
            time.sleep(0.2)
        for k in paced(rate_hz, args.node_warmup_s):  # warm-up: discovery, first frames
            peer.publish(k)
        time.sleep(1.0)
        before = dict(peer.diagnostics)
        published = [peer.publish(k) for k in paced(rate_hz, seconds)]
        time.sleep(2.0)  # the last chunks and a diagnostics message arrive
        ages = [(peer.arrivals[s] - s) * 1e3 for s in published if s in peer.arrivals]
        after = dict(peer.diagnostics)
    finally:
        peer.close()
        node.send_signal(2)
        node.wait(30)
        log.close()

    def delta(key):
        return int(after.get(key, 0)) - int(before.get(key, 0))

    return {
        "observations_published": len(published),
        "chunks_received": len(ages),
        "age_on_arrival_ms": percentiles(ages),
        "node_engine_total_ms": {
            "p50": float(after["engine_total_p50_ms"]),
            "p99": float(after["engine_total_p99_ms"]),
        },
        "node_counts": {
            k: delta(k) for k in ("observations", "fresh", "misses", "tails", "dropped", "refused")
        },
        # where the difference goes: the peer sending (stamp -> last publish returned), the node's own time
        # (last input message in -> submitted, which includes preparing the images; chunk -> published)
        "peer_publish_ms": percentiles(peer.publish_ms[-len(published) :]),
        "node_spans_ms": {
            span: {q: float(after[f"{span}_{q}_ms"]) for q in ("p50", "p99")}
            for span in ("node_in", "node_out")
        },
        "model_id": after.get("model_id"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="pi05_tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="float32")
    p.add_argument("--fp8-expert", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rate-hz", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=int, default=20, help="frames before the in-process measurement")
    p.add_argument("--node-warmup-s", type=float, default=5.0)
    p.add_argument("--startup-timeout", type=float, default=500.0)
    p.add_argument("--instant", action="store_true", help="a policy that answers at once: the node's floor")
    p.add_argument("--out", default="node_latency.json")
    args = p.parse_args(argv)

    import torch
    from vla_runtime.runtime.config import RuntimeConfig

    config = RuntimeConfig(
        preset=args.preset,
        device=args.device,
        precision=args.precision,
        fp8_expert=args.fp8_expert,
        steps=args.steps,
        optional_cameras=("right_wrist_0_rgb",),
    )
    data = frames(np.random.default_rng(0), 16)
    out = Path(args.out)
    baseline = engine_baseline(config, data, args.rate_hz, args.seconds, args.warmup, args.instant)
    print("in-process:", json.dumps(baseline))
    node = through_the_node(args, data, args.rate_hz, args.seconds, out.with_suffix(".node.log"))
    print("node:", json.dumps(node))
    result = {
        "benchmark": "node_latency",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": recorded_commit(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "in_process": baseline,
        "node": node,
        "node_adds_ms": {
            q: node["age_on_arrival_ms"][q] - baseline["submit_to_chunk_ms"][q] for q in ("p50", "p99")
        },
    }
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["node_adds_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
