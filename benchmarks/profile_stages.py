"""Per-kernel device time of each stage (compiled, not captured, so the profiler sees every kernel).

python3 benchmarks/profile_stages.py [--preset pi05] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from vla_runtime.runtime.buffers import ShapeProfile, StaticBuffers
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.stages import STAGES, StageRunner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--out", default="out")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    parts = build_parts(RuntimeConfig(preset=args.preset, device="cuda", precision="bf16"))
    cfg = parts.config.model
    device = torch.device("cuda")
    runner = StageRunner(
        parts.model,
        StaticBuffers(
            cfg, ShapeProfile(cfg.num_views, cfg.max_token_len, 10), device, parts.model.compute_dtype
        ),
        device,
        compile_stages=True,
    )
    slot = runner.buffers.device_slots[0]
    slot.pixels.random_(0, 255)
    slot.image_masks.fill_(True)
    slot.tokens.random_(0, 300)
    slot.token_masks[:, :40] = True
    slot.noise.normal_()
    summary = {}
    with torch.inference_mode():
        for stage in STAGES:
            for _ in range(3):
                runner.run(stage, 0)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner.run(stage, 0)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            total = sum(e.device_time_total for e in events) / 5 / 1e3
            kernels = sum(e.count for e in events) / 5
            rows = sorted(events, key=lambda e: -e.device_time_total)[: args.top]
            print(f"\n== {stage}: {total:.3f} ms of kernel time per call, {kernels:.0f} kernels per call")
            for e in rows:
                ms = e.device_time_total / 5 / 1e3
                print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  x{e.count // 5:<5d} {e.key[:90]}")
            summary[stage] = {
                "kernel_ms": total,
                "kernels": kernels,
                "top": [
                    {"name": e.key, "ms": e.device_time_total / 5 / 1e3, "calls": e.count // 5} for e in rows
                ],
            }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"profile-{args.preset}.json").write_text(json.dumps(summary, indent=2))
    np.set_printoptions()


if __name__ == "__main__":
    main()
