"""A policy node's restart as the robot sees it (issue 16, item 3): the node started in a fresh process
against one compile cache directory, first empty (cold), then as the first start left it (warm), while a
peer publishes camera frames at 30 Hz from the moment of the spawn. Per start: spawn -> the node's
log says it is serving, spawn -> the peer sees the node's camera subscription (DDS discovery, which can
come after the node serves), and spawn -> the first chunk at the peer (imports, weights, compilation or
loading, capture, discovery and the first frame, all of it). One peer serves every start.

    python benchmarks/node_startup.py OUT.json [--preset pi05] [--mode fp8_all] [--starts 3]
        [--bytecode-cache]

Not a CI test (it measures time). Needs rclpy (ROS 2 Jazzy wheels) beside torch.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from results_doc import run_header, save
from robot_peer import CAMERAS, RobotPeer, frames, paced, policy_node_command
from startup_bench import child_environment

RATE_HZ = 30.0


def node_params(preset: str, mode: str, device: str, cache_dir: str) -> dict:
    """The node's parameters: the precision options of `mode` (GPU_PRECISION_OPTIONS), the compile cache."""
    from vla_runtime.runtime.config import GPU_PRECISION_OPTIONS

    options = GPU_PRECISION_OPTIONS[mode] if device.startswith("cuda") else {}
    return {
        "preset": preset,
        "device": device,
        **{k: str(v).lower() if isinstance(v, bool) else v for k, v in options.items()},
        "compile_cache": cache_dir,
        "cameras": "[" + ",".join(f"'{c}'" for c in CAMERAS) + "]",
        "optional_cameras": "['right_wrist_0_rgb']",
    }


def one_start(peer: RobotPeer, params: dict, pycache: str | None, log_path: Path, timeout_s: float) -> dict:
    """Spawn the node, publish until its first chunk arrives, stop it (SIGINT, as `ros2 launch` does)."""
    peer.arrivals.clear()
    peer.diagnostics.clear()
    log = open(log_path, "w")
    spawned_wall, spawned = time.time(), time.monotonic()
    node = subprocess.Popen(
        policy_node_command(params), stdout=log, stderr=subprocess.STDOUT, env=child_environment(pycache)
    )
    discovered_s, k = None, 0
    try:
        for k in paced(RATE_HZ, timeout_s):
            if peer.arrivals:
                break
            if node.poll() is not None:
                raise RuntimeError(f"the node exited (rc {node.returncode}); see {log_path}")
            if discovered_s is None and peer.node_listens():
                discovered_s = time.monotonic() - spawned
            peer.publish(k, instruction=True)  # a node just started has not heard it yet
        else:
            raise RuntimeError(f"no chunk from the node in {timeout_s:g} s; see {log_path}")
        first_chunk_s = min(peer.arrivals.values()) - spawned_wall
    finally:
        node.send_signal(2)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()
    lines = log_path.read_text().splitlines()
    serving = next((line for line in lines if "]: serving" in line), None)
    return {
        "bytecode_cached": pycache is not None,
        # the node's log stamps its lines with the wall clock: "[INFO] [<seconds>] [policy_node]: serving..."
        "spawn_to_serving_s": float(serving.split("] [")[1]) - spawned_wall if serving else None,
        # DDS discovery: when this peer first saw the node's camera subscription (polled at RATE_HZ)
        "spawn_to_discovered_s": discovered_s,
        "spawn_to_first_chunk_s": first_chunk_s,
        "observations_published": k,
        "ready_line": next((line for line in lines if "]: ready in" in line), "").strip()[:400],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--mode", default="fp8_all")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--starts", type=int, default=3, help="the first is cold, the rest warm")
    parser.add_argument("--bytecode-cache", action="store_true", help="keep Python's bytecode between starts")
    parser.add_argument("--timeout-s", type=float, default=400.0)
    args = parser.parse_args()
    doc = {
        **run_header(),
        "benchmark": "node_startup",
        "workload": f"{args.preset}, {args.mode if args.device.startswith('cuda') else args.device}, "
        f"policy node in its own process, peer at {RATE_HZ:g} Hz",
        "starts": [],
    }
    peer = RobotPeer(frames(np.random.default_rng(0), 4))
    try:
        with tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryDirectory() as pycache:
            params = node_params(args.preset, args.mode, args.device, cache_dir)
            doc["params"] = {k: v for k, v in params.items() if k != "compile_cache"}
            for i in range(args.starts):
                log_path = args.out.with_name(f"{args.out.stem}-start{i}.log")
                start = one_start(
                    peer, params, pycache if args.bytecode_cache else None, log_path, args.timeout_s
                )
                start["cold"] = i == 0
                print(start, flush=True)
                doc["starts"].append(start)
                save(doc, args.out)
    finally:
        peer.close()


if __name__ == "__main__":
    main()
