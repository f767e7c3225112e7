"""Closed-loop results: per-episode records, per-task and per-suite summaries, a JSON file, a Markdown
report with a latency histogram, and optionally a GIF of each episode's agent view."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.timing import percentiles

DEADLINE_MS = 50.0  # one control period at 20 Hz (runtime.scheduler.DEFAULT_DEADLINE_S)

# What the figures mean, said once and printed with them (docs/robot.md has the timeline picture).
LATENCY_MEANING = (
    "age of a chunk = its arrival at the robot - the time its observation was taken (wall clock)"
)
MISS_MEANING = f"miss = no chunk for an observation (or a newer one) within {DEADLINE_MS:.0f} ms of it"
LOCKSTEP_NOTE = "lockstep: the simulator waited for every chunk, so misses did not disturb the episode"
# What write_report writes into a run's folder
RESULTS_FILE, REPORT_FILE, HISTOGRAM_FILE = "results.json", "report.md", "latency_histogram.png"
REPORT_FILES = (RESULTS_FILE, REPORT_FILE, HISTOGRAM_FILE)


@dataclass
class EpisodeResult:
    suite: str
    task: int
    init_state: int
    instruction: str
    path: str  # "in-process lockstep", "ros lockstep", "ros wall-clock", ...
    steps: int = 0
    success: bool = False
    success_per_step: list[bool] = field(default_factory=list)  # LIBERO's check after every step
    chunks: int = 0
    deadline_misses: int = 0
    exhausted: int = 0  # misses with no action of the current chunk left (wall clock)
    late_actions: int = 0  # lockstep: leading actions of a chunk already cut when it arrived (expected 0)
    sim_overruns: int = 0  # wall clock: steps the simulator took longer than a control period
    reoffers: int = 0  # observations sent again after a second without an answer (lost on the way)
    executed_indices: list[int] = field(default_factory=list)  # lockstep: which action of each chunk ran
    chunk_age_ms: list[float] = field(default_factory=list)  # one per chunk: the latency the robot sees
    # lockstep: the distance between consecutive executed actions, at a hand-over between chunks and within
    # a chunk (the first should look like the second when the hand-over is smooth)
    splice_jumps: list[float] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    engine_ms: dict[str, list[float]] = field(default_factory=dict)  # stage -> one per chunk (in-process)
    # Where the episode's wall time went: the reset (the settle steps, and an environment build when the
    # task changed), each step's round trip to the sim server and the simulator's own part of it (when the
    # server says), the waits for chunks (wall clock: the first chunk's only; later ones overlap steps).
    wall_s: float = 0.0
    reset_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    sim_ms: list[float] = field(default_factory=list)
    chunk_wait_ms: list[float] = field(default_factory=list)
    video: str | None = None
    policy_diagnostics: dict | None = None  # ROS path: the policy node's diagnostics at the end

    def add_chunk(self, age_ms: float, engine_ms: dict[str, float]) -> None:
        self.chunks += 1
        self.chunk_age_ms.append(float(age_ms))
        for stage, ms in engine_ms.items():
            self.engine_ms.setdefault(stage, []).append(float(ms))

    def summary(self) -> dict:
        d = asdict(self)
        d["chunk_age_ms"] = percentiles(self.chunk_age_ms)
        d["engine_ms"] = {k: percentiles(v) for k, v in self.engine_ms.items()}
        del d["executed_indices"]
        d["splice_jumps"] = percentiles(self.splice_jumps, (50, 99))
        d["step_sizes"] = percentiles(self.step_sizes, (50, 99))
        for name in ("step_ms", "sim_ms", "chunk_wait_ms"):
            d[name] = percentiles(getattr(self, name), (50, 99))
        return d


def time_spent(episodes: list[EpisodeResult]) -> dict:
    """Where the episodes' wall time went, in seconds summed over episodes (with several workers the sum
    exceeds the run's wall time): resets, steps (of which the simulator's own time), waits for chunks, and
    the rest (the loop itself; sleeps in wall-clock mode)."""
    total = sum(e.wall_s for e in episodes)
    resets = sum(e.reset_ms for e in episodes) / 1e3
    steps = sum(sum(e.step_ms) for e in episodes) / 1e3
    waits = sum(sum(e.chunk_wait_ms) for e in episodes) / 1e3
    said = any(e.sim_ms for e in episodes)
    return {
        "episodes_s": round(total, 2),
        "resets_s": round(resets, 2),
        "steps_s": round(steps, 2),
        # None when the sim server did not say (an earlier version's)
        "simulator_s": round(sum(sum(e.sim_ms) for e in episodes) / 1e3, 2) if said else None,
        "chunk_waits_s": round(waits, 2),
        "other_s": round(total - resets - steps - waits, 2),
        "step_ms": percentiles([v for e in episodes for v in e.step_ms], (50, 99)),
        "simulator_step_ms": percentiles([v for e in episodes for v in e.sim_ms], (50, 99)),
    }


def engine_total_ms(episodes: list[EpisodeResult]) -> dict:
    """The engine's own submit -> chunk time: per chunk in-process, from the node's diagnostics over ROS."""
    values = [v for e in episodes for v in e.engine_ms.get("total", [])]
    if values:
        return percentiles(values, (50, 99))
    diags = [e.policy_diagnostics for e in episodes if e.policy_diagnostics]
    if diags and "engine_total_p50_ms" in diags[-1]:
        return {
            "p50": float(diags[-1]["engine_total_p50_ms"]),
            "p99": float(diags[-1]["engine_total_p99_ms"]),
        }
    return {"p50": float("nan"), "p99": float("nan")}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a success rate (sound at 0 or n successes, unlike the normal
    approximation): what 50 trials of a task can and cannot tell apart."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(max(0.0, centre - half)), 4), round(float(min(1.0, centre + half)), 4)]


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
        t["success_ci95"] = wilson_interval(t["successes"], t["episodes"])
    return {
        "episodes": len(episodes),
        "successes": sum(e.success for e in episodes),
        "success_rate": (sum(e.success for e in episodes) / len(episodes)) if episodes else 0.0,
        "chunks": sum(e.chunks for e in episodes),
        "deadline_misses": sum(e.deadline_misses for e in episodes),
        "exhausted": sum(e.exhausted for e in episodes),
        "late_actions": sum(e.late_actions for e in episodes),
        "sim_overruns": sum(e.sim_overruns for e in episodes),
        "reoffers": sum(e.reoffers for e in episodes),
        "chunk_age_ms": percentiles([v for e in episodes for v in e.chunk_age_ms]),
        "splice_jumps": percentiles([v for e in episodes for v in e.splice_jumps], (50, 99)),
        "step_sizes": percentiles([v for e in episodes for v in e.step_sizes], (50, 99)),
        "engine_total_ms": engine_total_ms(episodes),
        "time": time_spent(episodes),
        "definitions": {"latency": LATENCY_MEANING, "miss": MISS_MEANING},
        "tasks": tasks,
    }


def headline(summary: dict, path: str) -> list[str]:
    """The one latency figure and the one miss count, with what they mean (screen and report)."""
    age, engine = summary["chunk_age_ms"], summary["engine_total_ms"]
    lines = [
        f"latency: p50 {age['p50']:.1f} ms, p99 {age['p99']:.1f} ms "
        f"(the engine itself: p50 {engine['p50']:.1f} ms) -- {LATENCY_MEANING}",
        f"deadline misses: {summary['deadline_misses']} of {summary['chunks']} chunks -- {MISS_MEANING}",
    ]
    jump, size = summary["splice_jumps"], summary["step_sizes"]
    if jump["p50"] == jump["p50"]:  # some hand-over happened
        lines.append(
            f"hand-over: action jump at a chunk change p50 {jump['p50']:.3f} (p99 {jump['p99']:.3f}); "
            f"between actions of one chunk p50 {size['p50']:.3f}"
        )
    t = summary["time"]
    own = f"the simulator's own {t['simulator_s']:.1f}; " if t["simulator_s"] is not None else ""
    lines.append(
        f"time over the episodes: {t['episodes_s']:.1f} s, of which resets {t['resets_s']:.1f}, steps "
        f"{t['steps_s']:.1f} ({own}a step p50 {t['step_ms']['p50']:.1f} ms), waits for chunks "
        f"{t['chunk_waits_s']:.1f}, other {t['other_s']:.1f}"
    )
    if "lockstep" in path:
        lines.append(LOCKSTEP_NOTE)
    return lines


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    from PIL import Image  # noqa: PLC0415 - Pillow comes with matplotlib

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def latency_histogram(episodes: list[EpisodeResult], path: Path, bin_ms: float = 2.0) -> Path:
    """Chunk age and engine time per chunk, on one set of bins, against the deadline."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    ages = [v for e in episodes for v in e.chunk_age_ms]
    engine = [v for e in episodes for v in e.engine_ms.get("total", [])]
    top = max([DEADLINE_MS, *ages, *engine]) + bin_ms
    bins = np.arange(0.0, top + bin_ms, bin_ms)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if ages:
        ax.hist(ages, bins=bins, alpha=0.7, label=f"chunk age at the robot (p50 {np.median(ages):.1f} ms)")
    if engine:
        ax.hist(
            engine, bins=bins, alpha=0.6, label=f"engine, submit -> chunk (p50 {np.median(engine):.1f} ms)"
        )
    ax.axvline(DEADLINE_MS, color="red", ls="--", lw=1, label=f"{DEADLINE_MS:.0f} ms deadline")
    ax.set_title(f"Latency per chunk ({len(ages)} chunks, {bin_ms:g} ms bins)")
    ax.set_xlabel("ms from observation")
    ax.set_ylabel("chunks")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
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
    (out_dir / RESULTS_FILE).write_text(json.dumps(doc, indent=2))
    histogram = latency_histogram(episodes, out_dir / HISTOGRAM_FILE)
    lines = [
        f"# LIBERO closed-loop evaluation ({doc['date']})",
        "",
        f"- model: `{meta.get('model_id')}`"
        + (
            " — **random weights: actions are meaningless, success is not expected**"
            if meta.get("random_weights")
            else ""
        ),
        f"- path: {meta.get('path')}, device: {meta.get('device')}, "
        f"denoising steps: {meta.get('denoising_steps')}, replan every {meta.get('replan_steps')} actions",
        f"- success (LIBERO's own check): {summary['successes']}/{summary['episodes']} "
        f"({100 * summary['success_rate']:.0f}%)",
        *[f"- {line}" for line in headline(summary, meta.get("path", ""))],
        "",
        "| task | instruction | episodes | success | 95% interval | steps |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for name, t in summary["tasks"].items():
        lo, hi = t["success_ci95"]
        lines.append(
            f"| {name} | {t['instruction']} | {t['episodes']} | {100 * t['success_rate']:.0f}% | "
            f"{100 * lo:.0f}-{100 * hi:.0f}% | {', '.join(map(str, t['steps']))} |"
        )
    age = summary["chunk_age_ms"]
    lines += [
        "",
        "| figure | p50 ms | p90 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
        f"| chunk age at the robot | {age['p50']:.2f} | {age['p90']:.2f} | {age['p99']:.2f} |",
    ]
    stages = sorted({s for e in episodes for s in e.engine_ms})
    for stage in stages:
        p = percentiles([v for e in episodes for v in e.engine_ms.get(stage, [])])
        lines.append(f"| engine: {stage} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} |")
    for e in episodes:
        if e.policy_diagnostics:
            engine = {k: v for k, v in e.policy_diagnostics.items() if k.startswith("engine_")}
            lines += [
                "",
                f"Policy node's diagnostics at the end of task {e.task} (the engine's own time): "
                + ", ".join(f"{k} {v}" for k, v in sorted(engine.items())),
            ]
            break
    lines += ["", f"![latency histogram]({histogram.name})", ""]
    for e in episodes:
        if e.video:
            lines.append(f"![{e.suite} task {e.task} init {e.init_state}]({Path(e.video).name})")
    (out_dir / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return summary
