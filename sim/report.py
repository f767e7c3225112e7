"""Closed-loop results: per-episode records, per-task and per-suite summaries, a JSON file, a Markdown
report with a latency histogram, and optionally a GIF of each episode's agent view."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.timing import percentiles

DEADLINE_MS = 50.0  # one control period at 20 Hz


@dataclass
class EpisodeResult:
    suite: str
    task: int
    init_state: int
    instruction: str
    path: str  # "in-process" or "ros"
    steps: int = 0
    success: bool = False
    success_per_step: list[bool] = field(default_factory=list)  # LIBERO's check after every step
    chunks: int = 0
    deadline_misses: int = 0
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # stage -> one value per chunk
    video: str | None = None
    policy_diagnostics: dict | None = None  # ROS path: the policy node's last diagnostics (per-stage latency)

    def add_timings(self, timings: dict[str, float]) -> None:
        self.chunks += 1
        for stage, ms in timings.items():
            self.latency_ms.setdefault(stage, []).append(float(ms))

    def summary(self) -> dict:
        d = asdict(self)
        d["latency_ms"] = {k: percentiles(v) for k, v in self.latency_ms.items()}
        return d


def summarize(episodes: list[EpisodeResult]) -> dict:
    tasks: dict[str, dict] = {}
    for e in episodes:
        t = tasks.setdefault(
            f"{e.suite}/{e.task}", {"instruction": e.instruction, "episodes": 0, "successes": 0, "steps": []}
        )
        t["episodes"] += 1
        t["successes"] += int(e.success)
        t["steps"].append(e.steps)
    for t in tasks.values():
        t["success_rate"] = t["successes"] / t["episodes"]
    totals = [v for e in episodes for v in e.latency_ms.get("total", [])]
    return {
        "episodes": len(episodes),
        "successes": sum(e.success for e in episodes),
        "success_rate": (sum(e.success for e in episodes) / len(episodes)) if episodes else 0.0,
        "deadline_misses": sum(e.deadline_misses for e in episodes),
        "chunks": sum(e.chunks for e in episodes),
        "latency_ms": {
            stage: percentiles([v for e in episodes for v in e.latency_ms.get(stage, [])])
            for stage in sorted({s for e in episodes for s in e.latency_ms})
        },
        "total_latency_samples": len(totals),
        "tasks": tasks,
    }


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    from PIL import Image  # noqa: PLC0415 - Pillow comes with matplotlib

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def latency_histogram(episodes: list[EpisodeResult], path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for stage in ("vision", "prefix", "denoise", "total"):
        values = [v for e in episodes for v in e.latency_ms.get(stage, [])]
        if values:
            ax.hist(values, bins=30, alpha=0.6, label=f"{stage} (p50 {np.median(values):.1f} ms)")
    ax.axvline(DEADLINE_MS, color="red", ls="--", lw=1, label="50 ms deadline")
    ax.set_xlabel("ms per chunk")
    ax.set_ylabel("chunks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: Path, episodes: list[EpisodeResult], meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(episodes)
    doc = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **meta,
        "summary": summary,
        "episodes": [e.summary() for e in episodes],
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2))
    histogram = latency_histogram(episodes, out_dir / "latency_histogram.png")
    lines = [
        f"# LIBERO closed-loop evaluation ({doc['date']})",
        "",
        f"- model: `{meta.get('model_id')}`"
        + (
            " — **random weights: actions are meaningless, success is not expected**"
            if meta.get("random_weights")
            else ""
        ),
        f"- path: {meta.get('path')}, device: {meta.get('device')}, steps: {meta.get('denoising_steps')}, "
        f"replan every {meta.get('replan_steps')} actions",
        f"- success (LIBERO's own check): {summary['successes']}/{summary['episodes']} "
        f"({100 * summary['success_rate']:.0f}%)",
        f"- deadline misses (chunks over {DEADLINE_MS:.0f} ms): {summary['deadline_misses']} of "
        f"{summary['chunks']} chunks",
        "",
        "| task | instruction | episodes | success | steps |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, t in summary["tasks"].items():
        lines.append(
            f"| {name} | {t['instruction']} | {t['episodes']} | {100 * t['success_rate']:.0f}% | "
            f"{', '.join(map(str, t['steps']))} |"
        )
    lines += ["", "| stage | p50 ms | p90 ms | p99 ms |", "| --- | ---: | ---: | ---: |"]
    for stage, p in summary["latency_ms"].items():
        lines.append(f"| {stage} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} |")
    for e in episodes:
        if e.policy_diagnostics:
            stages = {k: v for k, v in e.policy_diagnostics.items() if k.endswith("_ms")}
            lines += [
                "",
                f"Policy node, per stage (its diagnostics at the end of task {e.task}): "
                + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())),
            ]
    lines += ["", f"![latency histogram]({histogram.name})", ""]
    for e in episodes:
        if e.video:
            lines.append(f"![{e.suite} task {e.task} init {e.init_state}]({Path(e.video).name})")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary
