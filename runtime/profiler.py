"""Layer profiler: device time per layer and per kernel of each stage, with a Chrome trace.

The questions a TensorRT layer profiler answers, for our stages. Stages run uncompiled and uncaptured
(so the profiler sees every kernel and every layer); each layer's work is wrapped in a named range.
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
    slot = runner.buffers.device_slots[0]
    slot.pixels.random_(0, 255)
    slot.image_masks.fill_(True)
    slot.tokens.random_(0, 300)
    slot.token_masks[:, : min(60, cfg.max_token_len)] = True
    slot.noise.normal_()
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
        if cuda:  # kernels only: aten ops and ranges would count the same device time again
            leaves = [
                e
                for e in events
                if e.device_type == DeviceType.CUDA
                and e.self_device_time_total > 0
                and not e.key.startswith(LAYER_RANGES)
            ]  # the layer ranges also appear on the GPU
            self_us, total_us = (lambda e: e.self_device_time_total), (lambda e: e.device_time_total)
        else:
            leaves = [e for e in events if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
            self_us, total_us = (lambda e: e.self_cpu_time_total), (lambda e: e.cpu_time_total)
        total_ms = sum(self_us(e) for e in leaves) / repeats / 1e3
        layers = sorted((e for e in events if e.key.startswith(f"{stage}.layer")), key=lambda e: e.key)
        ranked = sorted(leaves, key=lambda e: -self_us(e))[:top]
        report[stage] = {
            "device": "cuda" if cuda else "cpu",
            "total_ms": total_ms,
            "ops_per_call": sum(e.count for e in leaves) / repeats,
            "layers": [
                {"name": e.key, "ms": total_us(e) / repeats / 1e3, "calls": e.count // repeats}
                for e in layers
            ],
            "top": [
                {
                    "name": e.key,
                    "ms": self_us(e) / repeats / 1e3,
                    "share": self_us(e) / repeats / 1e3 / total_ms if total_ms else 0.0,
                    "calls": e.count // repeats,
                }
                for e in ranked
            ],
        }
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(
                str(out_dir / f"profile-{config.preset}-{config.precision}-{stage}.trace.json")
            )
    if out_dir is not None:
        (out_dir / f"profile-{config.preset}-{config.precision}.json").write_text(
            json.dumps(report, indent=2)
        )
    return report


def format_report(report: dict) -> str:
    lines = []
    for stage, r in report.items():
        what = "kernel time" if r["device"] == "cuda" else "CPU op time"
        lines.append(
            f"== {stage}: {r['total_ms']:.3f} ms of {what}, {r['ops_per_call']:.0f} kernels/ops per call"
        )
        if r["layers"]:
            slowest = sorted(r["layers"], key=lambda x: -x["ms"])[:5]
            lines.append("  slowest layers: " + ", ".join(f"{x['name']} {x['ms']:.3f} ms" for x in slowest))
        for k in r["top"]:
            lines.append(f"  {k['ms']:8.3f} ms {100 * k['share']:5.1f}%  x{k['calls']:<5d} {k['name'][:90]}")
    return "\n".join(lines)
