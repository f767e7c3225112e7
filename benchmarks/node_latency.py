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
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from results_doc import recorded_commit

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def frames(rng: np.random.Generator, n: int, side: int = 224) -> list[tuple[dict, np.ndarray]]:
    """`n` distinct observations (camera images, state), cycled by both measurements."""
    return [
        (
            {c: rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for c in CAMERAS},
            rng.uniform(-1, 1, 8).astype(np.float32),
        )
        for _ in range(n)
    ]


def paced(rate_hz: float, seconds: float):
    """Yields at `rate_hz` for `seconds` (sleeping between ticks)."""
    period, start = 1.0 / rate_hz, time.perf_counter()
    k = 0
    while (tick := start + k * period) < start + seconds:
        time.sleep(max(0.0, tick - time.perf_counter()))
        yield k
        k += 1


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
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    import rclpy
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory
    from vla_runtime.nodes.conversions import rgb_to_image, seconds_to_stamp, stamp_to_seconds

    params = {
        "preset": args.preset,
        "device": args.device,
        "precision": args.precision,
        "fp8_expert": str(args.fp8_expert).lower(),
        "steps": args.steps,
        "cameras": "[" + ",".join(f"'{c}'" for c in CAMERAS) + "]",
        "optional_cameras": "['right_wrist_0_rgb']",
    }
    if args.instant:
        command = [sys.executable, str(Path(__file__).with_name("instant_policy_node.py")), "--ros-args"]
    else:
        command = [sys.executable, "-m", "vla_runtime", "node", "--ros-args"]
    for k, v in params.items():
        command += ["-p", f"{k}:={v}"]
    log = open(log_path, "w")
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    peer = rclpy.create_node("robot_peer")
    cams = {
        c: peer.create_publisher(Image, f"camera/{c}/image_raw", qos_profile_sensor_data) for c in CAMERAS
    }
    state_pub = peer.create_publisher(JointState, "joint_states", 10)
    instruction_pub = peer.create_publisher(String, "instruction", 10)
    arrivals: dict[float, float] = {}
    diagnostics: dict = {}

    def on_chunk(raw: bytes):
        # raw: the arrival time is taken before Python builds the message (a robot's C++ controller would
        # not pay for that); the stamp is read afterwards
        now = time.time()
        msg = deserialize_message(raw, JointTrajectory)
        arrivals.setdefault(round(stamp_to_seconds(msg.header.stamp), 6), now)

    def on_diag(msg):
        for status in msg.status:
            if status.name.startswith("/policy_node"):
                diagnostics.clear()
                diagnostics.update({kv.key: kv.value for kv in status.values})

    peer.create_subscription(
        JointTrajectory,
        "action_chunk",
        on_chunk,
        QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE),
        raw=True,
    )
    peer.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(peer)
    threading.Thread(target=executor.spin, daemon=True).start()

    # The messages are built ahead, as a camera driver has its buffer ready; each is stamped when sent.
    prebuilt = [
        ({c: rgb_to_image(images[c], Image) for c in CAMERAS}, JointState(position=state.tolist()))
        for images, state in data
    ]
    publish_ms = []

    def publish(k: int) -> float:
        image_msgs, state_msg = prebuilt[k % len(prebuilt)]
        start = time.perf_counter()
        stamp = seconds_to_stamp(time.time(), Time)
        for camera, pub in cams.items():
            image_msgs[camera].header.stamp = stamp
            pub.publish(image_msgs[camera])
        state_msg.header.stamp = stamp
        state_pub.publish(state_msg)
        if k % 30 == 0:  # the task instruction: once a second, as a robot would (not with every frame)
            instruction_pub.publish(String(data=INSTRUCTION))
        publish_ms.append((time.perf_counter() - start) * 1e3)
        return round(stamp_to_seconds(stamp), 6)

    try:
        deadline = time.monotonic() + args.startup_timeout
        while diagnostics.get("phase") != "serving":
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError(f"the node did not start serving; see {log_path}")
            time.sleep(0.2)
        for k in paced(rate_hz, args.node_warmup_s):  # warm-up: discovery, first frames
            publish(k)
        time.sleep(1.0)
        before = dict(diagnostics)
        published = [publish(k) for k in paced(rate_hz, seconds)]
        time.sleep(2.0)  # the last chunks and a diagnostics message arrive
        ages = [(arrivals[s] - s) * 1e3 for s in published if s in arrivals]
        after = dict(diagnostics)
    finally:
        executor.shutdown()
        peer.destroy_node()
        rclpy.shutdown()
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
        "peer_publish_ms": percentiles(publish_ms[-len(published) :]),
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
