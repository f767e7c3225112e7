"""Closed-loop LIBERO through ROS: the policy node in its own process, the sim bridge node here, the sim
server in LIBERO's environment; all on a ROS domain of their own, discovery on this machine only."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..sim.report import EpisodeResult, save_gif


def isolate_ros_domain() -> None:
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)


class PolicyNodeProcess:
    def __init__(self, log_path: Path, ros_params: dict):
        args = [sys.executable, "-m", "vla_runtime", "node", "--ros-args"]
        for k, v in ros_params.items():
            args += ["-p", f"{k}:={str(v).lower() if isinstance(v, bool) else v}"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def node_params(config, record: str | None = None) -> dict:
    """The policy node's parameters for a RuntimeConfig (only what differs from the node's defaults)."""
    from .params import STATE_IN_PROMPT

    params = {
        "device": config.device,
        "precision": config.precision,
        "steps": config.denoising_steps,
        "seed": config.seed,
        "state_dim": config.state_dim,
        "allow_unnormalized": config.allow_unnormalized,
        "fp8_expert": config.fp8_expert,
        "fp8_calibration_margin": config.fp8_calibration_margin,
    }
    optional = {
        "preset": config.preset,
        "checkpoint": config.checkpoint,
        "robot": config.robot,
        "tokenizer": config.tokenizer,
        "vision_precision": config.vision_precision,
        "fp8_calibration": config.fp8_calibration,
        "action_horizon": config.action_horizon,
        "n_action_steps": config.n_action_steps,
        "max_token_len": config.max_token_len,
        "state_in_prompt": {v: k for k, v in STATE_IN_PROMPT.items()}[config.state_in_prompt],
        "record_observations": str(Path(record).resolve()) if record else None,
    }
    return {**params, **{k: v for k, v in optional.items() if v is not None}}


def run_ros_episodes(
    endpoint: str,
    out_dir: Path,
    suite: str,
    tasks: list[int],
    trials: int,
    *,
    node_params: dict,
    mode: str,
    max_steps: int | None,
    replan_steps: int,
    seed: int,
    settle_steps: int,
    video: bool,
) -> list[EpisodeResult]:
    isolate_ros_domain()
    import rclpy  # noqa: PLC0415 - ROS is needed only on this path
    from rclpy.executors import SingleThreadedExecutor  # noqa: PLC0415

    from .sim_bridge_node import SimBridgeNode  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    params = {
        **node_params,
        # lockstep: the observation waits for the sim, so allow for a slow CPU simulator
        "max_obs_age_s": 30.0 if mode == "lockstep" else 0.5,
    }
    node_proc = PolicyNodeProcess(out_dir / "policy_node.log", params)
    rclpy.init()
    bridge = SimBridgeNode(endpoint)
    executor = SingleThreadedExecutor()
    executor.add_node(bridge)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    episodes = []
    try:
        for task in tasks:
            for trial in range(trials):
                frames: list = []
                if mode == "lockstep":
                    result = bridge.run_lockstep(
                        suite,
                        task,
                        trial,
                        max_steps=max_steps,
                        replan_steps=replan_steps,
                        seed=seed,
                        settle_steps=settle_steps,
                        frames=frames,
                    )
                else:
                    result = bridge.run_wall_clock(
                        suite, task, trial, max_steps=max_steps, seed=seed, settle_steps=settle_steps
                    )
                if video and frames:
                    name = f"{suite}_task{task}_init{trial}_{'success' if result.success else 'failure'}.gif"
                    result.video = str(save_gif(frames, out_dir / name))
                episodes.append(result)
                time.sleep(0.2)
    finally:
        executor.shutdown()
        bridge.client.close()
        bridge.destroy_node()
        rclpy.shutdown()
        node_proc.stop()
    return episodes
