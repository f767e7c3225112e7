"""Layer profiler: device time per layer and per kernel of each stage, with a Chrome trace.

The questions a TensorRT layer profiler answers, for our stages. Stages run compiled but not captured
(so the profiler sees every kernel); each layer's work is wrapped in a named range.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .buffers import ShapeProfile, StaticBuffers
from .config import RuntimeConfig
from .loading import build_parts
from .stages import STAGES, StageRunner


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
    parts = build_parts(config.replace(compile_stages=False))
    annotate_layers(parts.model)
    cfg, device = config.model, parts.device
    profile_shape = ShapeProfile(cfg.num_views, cfg.max_token_len, config.denoising_steps)
    runner = StageRunner(
        parts.model, StaticBuffers(cfg, profile_shape, device, parts.model.compute_dtype), device
    )
    slot = runner.buffers.device_slots[0]
    slot.pixels.random_(0, 255)
    slot.image_masks.fill_(True)
    slot.tokens.random_(0, 300)
    slot.token_masks[:, :60] = True
    slot.noise.normal_()
    report = {}
    for stage in stages:
        for _ in range(2):
            runner.run(stage, 0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                runner.run(stage, 0)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.self_device_time_total > 0]
        total_ms = sum(e.self_device_time_total for e in kernels) / repeats / 1e3
        layers = sorted((e for e in events if e.key.startswith(f"{stage}.layer")), key=lambda e: e.key)
        top_kernels = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
        report[stage] = {
            "total_ms": total_ms,
            "kernels_per_call": sum(e.count for e in kernels) / repeats,
            "layers": [
                {
                    "name": e.key,
                    "ms": e.device_time_total
                    / repeats
                    / 1e3
                    / max(1, e.count // repeats)
                    * (e.count // repeats),
                    "calls": e.count // repeats,
                }
                for e in layers
            ],
            "top": [
                {
                    "name": e.key,
                    "ms": e.self_device_time_total / repeats / 1e3,
                    "share": e.self_device_time_total / repeats / 1e3 / total_ms if total_ms else 0.0,
                    "calls": e.count // repeats,
                }
                for e in top_kernels
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
        lines.append(
            f"== {stage}: {r['total_ms']:.3f} ms of kernel time, {r['kernels_per_call']:.0f} kernels"
        )
        if r["layers"]:
            slowest = sorted(r["layers"], key=lambda x: -x["ms"])[:5]
            lines.append("  slowest layers: " + ", ".join(f"{x['name']} {x['ms']:.3f} ms" for x in slowest))
        for k in r["top"]:
            lines.append(f"  {k['ms']:8.3f} ms {100 * k['share']:5.1f}%  x{k['calls']:<5d} {k['name'][:90]}")
    return "\n".join(lines)
