"""Layer profiler: device time per layer and per kernel of each stage, with a Chrome trace.

The questions a TensorRT layer profiler answers, for our stages. Two views:
- `profile_stages`: stages run uncompiled and uncaptured, so the profiler sees every kernel and every
  layer; each layer's work is wrapped in a named range.
- `profile_captured` (CUDA): the stages as the executor serves them, compiled and captured in CUDA graphs;
  the kernels of their replays (Inductor's fused kernels, cuBLAS) with the graph's measured time. Layer
  ranges do not survive compilation, so this view is per kernel only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from .buffers import ShapeProfile, StaticBuffers
from .config import RuntimeConfig
from .loading import build_parts
from .stages import STAGES, StageRunner

LAYER_RANGES = ("vision.layer", "prefix.layer", "denoise.layer")


def _wrap(obj, method: str, label: str) -> None:
    original = getattr(obj, method)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(obj, method, wrapped)


def annotate_layers(model) -> None:
    for i, layer in enumerate(model.vision.encoder.layers):
        _wrap(layer, "forward", f"vision.layer{i:02d}")
    for stack, stage in ((model.prefix_lm, "prefix"), (model.expert, "denoise")):
        for i, layer in enumerate(stack.layers):
            _wrap(layer, "qkv", f"{stage}.layer{i:02d}.attention_in")
            _wrap(layer, "finish", f"{stage}.layer{i:02d}.attention_out_mlp")


def fill_random_inputs(slot, prompt_tokens: int = 60) -> None:
    slot.pixels.random_(0, 255)
    slot.image_masks.fill_(True)
    slot.tokens.random_(0, 300)
    slot.token_masks.fill_(False)
    slot.token_masks[:, : min(prompt_tokens, slot.token_masks.shape[1])] = True
    slot.noise.normal_()
    slot.state.normal_()


def _ranked(device: str, leaves, self_us, repeats: int, top: int) -> dict:
    total_ms = sum(self_us(e) for e in leaves) / repeats / 1e3
    return {
        "device": device,
        "total_ms": total_ms,
        "ops_per_call": sum(e.count for e in leaves) / repeats,
        "top": [
            {
                "name": e.key,
                "ms": self_us(e) / repeats / 1e3,
                "share": self_us(e) / repeats / 1e3 / total_ms if total_ms else 0.0,
                "calls": e.count // repeats,
            }
            for e in sorted(leaves, key=lambda e: -self_us(e))[:top]
        ],
    }


def kernel_table(events, repeats: int, top: int) -> dict:
    """CUDA kernels of a profile (`prof.key_averages()`), ranked by device time per call."""
    kernels = [
        e
        for e in events
        if e.device_type == DeviceType.CUDA
        and e.self_device_time_total > 0
        and not e.key.startswith(LAYER_RANGES)  # the layer ranges also appear on the GPU
    ]
    return _ranked("cuda", kernels, lambda e: e.self_device_time_total, repeats, top)


def cpu_op_table(events, repeats: int, top: int) -> dict:
    """aten ops of a CPU profile, ranked by self CPU time per call."""
    ops = [e for e in events if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    return _ranked("cpu", ops, lambda e: e.self_cpu_time_total, repeats, top)


def save_trace(prof, out_dir: Path | None, name: str) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out_dir / f"{name}.trace.json"))


def save_report(report: dict, out_dir: Path | None, name: str) -> dict:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    return report


@torch.inference_mode()
def profile_captured(
    config: RuntimeConfig, stages=STAGES, top: int = 15, repeats: int = 5, out_dir: Path | None = None
) -> dict:
    """The kernels of each stage's CUDA graph, compiled as the executor compiles it, and the graph's
    median time over 50 replays (CUDA events, warm-up excluded)."""
    if not config.device.startswith("cuda"):
        raise ValueError("device: profiling the captured graphs needs CUDA (--captured)")
    parts = build_parts(config)
    cfg, device = config.model, parts.device
    profile_shape = ShapeProfile(cfg.num_views, cfg.max_token_len, config.denoising_steps)
    buffers = StaticBuffers(cfg, profile_shape, device, parts.model.compute_dtype)
    for slot in buffers.device_slots:
        fill_random_inputs(slot)
    runner = StageRunner(parts.model, buffers, device, config.use_compile, compile_scope=config.compile_scope)
    streams = {stage: torch.cuda.Stream(device) for stage in stages}
    runner.capture(streams, {stage: torch.cuda.graph_pool_handle() for stage in stages}, stages=stages)
    # Every stage timed before any is profiled: after a profiler session graph replays may stay slower in
    # the process (docs/performance.md, "A drift in the stage experiments").
    graph_ms = {}
    for stage in stages:
        with torch.cuda.stream(streams[stage]):
            times = []
            for i in range(60):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runner.run(stage, 0)
                end.record()
                end.synchronize()
                if i >= 10:
                    times.append(start.elapsed_time(end))
        graph_ms[stage] = sorted(times)[len(times) // 2]
    report = {}
    for stage in stages:
        with torch.cuda.stream(streams[stage]):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(repeats):
                    runner.run(stage, 0)
                torch.cuda.synchronize()
        report[stage] = {
            **kernel_table(prof.key_averages(), repeats, top),
            "graph_ms": graph_ms[stage],
            "compiled": stage in config.use_compile,
            "layers": [],
        }
        save_trace(prof, out_dir, f"captured-{config.model_name}-{config.precision}-{stage}")
    return save_report(report, out_dir, f"captured-{config.model_name}-{config.precision}")


@torch.inference_mode()
def profile_stages(
    config: RuntimeConfig, stages=STAGES, top: int = 15, repeats: int = 5, out_dir: Path | None = None
) -> dict:
    """On CUDA: kernel time (self device time of CUDA kernels) per kernel and per layer range.
    On the CPU: self CPU time of the aten ops instead, for the same questions on the tiny presets."""
    parts = build_parts(config.replace(compile_stages=False))
    annotate_layers(parts.model)
    cfg, device = config.model, parts.device
    cuda = device.type == "cuda"
    profile_shape = ShapeProfile(cfg.num_views, cfg.max_token_len, config.denoising_steps)
    runner = StageRunner(
        parts.model, StaticBuffers(cfg, profile_shape, device, parts.model.compute_dtype), device
    )
    fill_random_inputs(runner.buffers.device_slots[0])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    report = {}
    for stage in stages:
        for _ in range(2):
            runner.run(stage, 0)
        sync()
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                runner.run(stage, 0)
            sync()
        events = prof.key_averages()
        # On CUDA kernels only (aten ops and ranges would count the same device time again); on the CPU
        # the aten ops' self time.
        report[stage] = kernel_table(events, repeats, top) if cuda else cpu_op_table(events, repeats, top)
        layers = sorted((e for e in events if e.key.startswith(f"{stage}.layer")), key=lambda e: e.key)
        layer_ms = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
        report[stage]["layers"] = [
            {"name": e.key, "ms": layer_ms(e) / repeats / 1e3, "calls": e.count // repeats} for e in layers
        ]
        save_trace(prof, out_dir, f"profile-{config.model_name}-{config.precision}-{stage}")
    return save_report(report, out_dir, f"profile-{config.model_name}-{config.precision}")


def format_report(report: dict) -> str:
    lines = []
    for stage, r in report.items():
        what = "kernel time" if r["device"] == "cuda" else "CPU op time"
        lines.append(
            f"== {stage}: {r['total_ms']:.3f} ms of {what}, {r['ops_per_call']:.0f} kernels/ops per call"
        )
        if "graph_ms" in r:
            lines.append(
                f"  captured CUDA graph{' (compiled)' if r['compiled'] else ''}: {r['graph_ms']:.3f} ms per "
                "replay (median of 50); layers are not visible once compiled"
            )
        if r["layers"]:
            slowest = sorted(r["layers"], key=lambda x: -x["ms"])[:5]
            lines.append("  slowest layers: " + ", ".join(f"{x['name']} {x['ms']:.3f} ms" for x in slowest))
        for k in r["top"]:
            lines.append(f"  {k['ms']:8.3f} ms {100 * k['share']:5.1f}%  x{k['calls']:<5d} {k['name'][:90]}")
    return "\n".join(lines)
