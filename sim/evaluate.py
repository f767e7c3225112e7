"""`vla-runtime eval-libero`: closed-loop LIBERO episodes with the policy in this process.

Lockstep: the simulator waits for the policy. Every `replan_steps` actions the newest observation goes
to the policy and the first `replan_steps` actions of its chunk are executed (openpi's LIBERO example).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

from tqdm import tqdm

from ..runtime.policy import Policy
from .client import SimClient
from .mapping import to_libero_action, to_observation
from .report import DEADLINE_MS, EpisodeResult, save_gif

# LIBERO's per-suite step limits (openpi's LIBERO example: the longest training demo plus margin).
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}


def run_episode(
    client: SimClient,
    policy: Policy,
    suite: str,
    task: int,
    init_state: int = 0,
    *,
    max_steps: int | None = None,
    replan_steps: int = 5,
    seed: int = 7,
    settle_steps: int = 10,
    video_dir: Path | None = None,
    recorder=None,
) -> EpisodeResult:
    sim_obs = client.reset(suite, task, init_state, seed, settle_steps)
    result = EpisodeResult(suite, task, init_state, sim_obs["instruction"], "in-process")
    limit = max_steps or MAX_STEPS.get(suite, 300)
    plan: collections.deque = collections.deque()
    frames = [sim_obs["agentview"]]
    policy.reset()
    while result.steps < limit:
        if not plan:
            obs = to_observation(sim_obs, time.time())
            if recorder is not None:
                recorder.write(obs)  # runtime.recording.ObservationRecorder: for `vla-runtime calibrate`
            chunk = policy.infer(obs)
            result.add_timings(chunk.timings_ms)
            result.deadline_misses += int(chunk.timings_ms.get("total", 0.0) > DEADLINE_MS)
            plan.extend(chunk.actions[:replan_steps])
        reply = client.step(to_libero_action(plan.popleft()))
        sim_obs = reply["observation"]
        result.steps += 1
        result.success_per_step.append(bool(reply["success"]))
        frames.append(sim_obs["agentview"])
        if reply["success"] or reply["done"]:
            break
    result.success = any(result.success_per_step)
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
        name = f"{suite}_task{task}_init{init_state}_{'success' if result.success else 'failure'}.gif"
        result.video = str(save_gif(frames, video_dir / name))
    return result


def evaluate(
    client: SimClient,
    policy: Policy,
    suite: str,
    tasks: list[int] | None,
    trials: int,
    *,
    max_steps: int | None,
    replan_steps: int,
    seed: int,
    settle_steps: int,
    video_dir: Path | None,
    recorder=None,
) -> list[EpisodeResult]:
    if tasks is None:
        tasks = [t["index"] for t in client.tasks(suite)]
    episodes = []
    with tqdm(total=len(tasks) * trials, desc=f"{suite}", unit="episode") as bar:
        for task in tasks:
            for trial in range(trials):
                episodes.append(
                    run_episode(
                        client,
                        policy,
                        suite,
                        task,
                        trial,
                        max_steps=max_steps,
                        replan_steps=replan_steps,
                        seed=seed,
                        settle_steps=settle_steps,
                        video_dir=video_dir,
                        recorder=recorder,
                    )
                )
                bar.set_postfix(success=sum(e.success for e in episodes))
                bar.update()
    return episodes
