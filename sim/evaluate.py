"""`vla-runtime eval-libero`: closed-loop LIBERO episodes over any PolicyLink (in-process or ROS), with a
progress bar over episodes and a progress line within each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .episode import PolicyLink, run_episode
from .report import DEADLINE_MS, EpisodeResult


def evaluate(
    client,
    link: PolicyLink,
    suite: str,
    tasks: list[int] | None,
    trials: int,
    *,
    max_steps: int | None,
    replan_steps: int,
    seed: int,
    delay_steps: int = 0,
    settle_steps: int,
    video_dir: Path | None,
) -> list[EpisodeResult]:
    if tasks is None:
        tasks = [t["index"] for t in client.tasks(suite)]
    episodes = []
    with tqdm(total=len(tasks) * trials, desc=f"{suite} ({link.path})", unit="episode") as bar:
        for task in tasks:
            for trial in range(trials):
                with tqdm(desc=f"  task {task} init {trial}", unit="step", leave=False) as steps:

                    def progress(result: EpisodeResult, steps=steps) -> None:
                        steps.update()
                        if result.chunk_age_ms:
                            steps.set_postfix(
                                age_p50_ms=f"{np.median(result.chunk_age_ms):.1f}",
                                chunks=result.chunks,
                                late_so_far=sum(a > DEADLINE_MS for a in result.chunk_age_ms),
                            )

                    episodes.append(
                        run_episode(
                            client,
                            link,
                            suite,
                            task,
                            trial,
                            max_steps=max_steps,
                            replan_steps=replan_steps,
                            delay_steps=delay_steps,
                            seed=seed,
                            settle_steps=settle_steps,
                            video_dir=video_dir,
                            progress=progress,
                        )
                    )
                bar.set_postfix(success=sum(e.success for e in episodes))
                bar.update()
    return episodes
