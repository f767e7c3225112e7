"""int8 and w4a8 next to bf16 and FP8 in one run on a CUDA GPU (issue 17, item 4).

1. The action expert's GEMMs alone, at its 50 rows: each mode's module on the same random bf16 weight,
   copied until the copies outgrow the L2 cache several times (so each call reads its weights from
   memory, as in the denoising loop), one call per copy captured in a CUDA graph, the replay timed with
   CUDA events (median of 50 after warm-up); bytes of weights each call reads, the bandwidth that
   achieves, and the error against float32.
   w4a8 is timed whole (smoothing, activation quantisation, kernel) and its kernel alone.
2. pi05 in the executor per mode: the per-stage and end-to-end median over `--frames` frames.

python benchmarks/integer_bench.py OUT.json [--frames 100] [--skip-executor]
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from results_doc import run_header, save
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.duquant import fit_smoothing
from vla_runtime.graphs.fp8 import FP8Linear
from vla_runtime.graphs.int8 import Int8Linear, quantize_per_row
from vla_runtime.graphs.w4a8 import W4A8Linear
from vla_runtime.graphs.w4a8_kernel import w4a8_matmul
from vla_runtime.runtime.config import GPU_PRECISION_OPTIONS, RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.synthetic import synthetic_observation

ROWS = 50  # the action horizon: the expert's GEMMs see 50 rows per step
COPIES_BYTES = 512 * 2**20  # the H200's L2 holds 50 MiB: this many bytes of copies read from memory
EXECUTOR_MODES = ("bf16", "fp8", "fp8_all", "int8", "w4a8")


class Bf16Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return F.linear(x, self.weight)

    def weight_bytes(self) -> int:
        return self.weight.numel() * 2


def copies_of(module: torch.nn.Module, nbytes: int) -> list[torch.nn.Module]:
    return [module] + [copy.deepcopy(module) for _ in range(max(COPIES_BYTES // nbytes, 20) - 1)]


def replay_us(fns: list, x: torch.Tensor, repeats: int = 50) -> float:
    """Median microseconds per call, from a CUDA graph that calls each of `fns` once on `x`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns[:3]:
            fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn(x)
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return float(np.median(times))


def kernel_alone(x_q: torch.Tensor, x_scale: torch.Tensor, layer: W4A8Linear) -> torch.Tensor:
    return w4a8_matmul(x_q, x_scale, layer.weight_packed, layer.weight_scales, torch.bfloat16)


def gemm_rows(peak_gbs: float) -> list[dict]:
    cfg = get_preset("pi05").expert
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in cfg.gemm_shapes().items():
        weight = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
        x = torch.randn(ROWS, k, generator=gen, device="cuda").to(torch.bfloat16)
        want = x.float() @ weight.float().T
        samples = torch.randn(256, k, generator=gen, device="cuda")
        fp8 = FP8Linear(weight)
        fp8.input_scale.fill_(float(x.abs().max()) / 448.0)
        w4a8 = W4A8Linear(weight, fit_smoothing(samples.cpu(), weight.cpu()))
        modules = {"bf16": Bf16Linear(weight), "fp8": fp8, "int8": Int8Linear(weight), "w4a8": w4a8}
        for mode, module in modules.items():
            nbytes = module.weight_bytes() if hasattr(module, "weight_bytes") else n * k + 4
            us = replay_us(copies_of(module, nbytes), x)
            got = module(x).float()
            rows.append(
                {
                    "gemm": name, "n": n, "k": k, "mode": mode, "us": us, "weight_bytes": nbytes,
                    "gbs": nbytes / us / 1e3, "of_peak": nbytes / us / 1e3 / peak_gbs,
                    "rel_err": float((got - want).norm() / want.norm()),
                }
            )  # fmt: skip
        # the kernel alone, on an already quantised input
        x_q, x_scale = quantize_per_row(x.float())
        nbytes = w4a8.weight_packed.numel() + w4a8.weight_scales.numel() * 4
        kernels = [
            functools.partial(kernel_alone, x_scale=x_scale, layer=layer) for layer in copies_of(w4a8, nbytes)
        ]
        us = replay_us(kernels, x_q)
        rows.append(
            {"gemm": name, "n": n, "k": k, "mode": "w4a8_kernel", "us": us, "weight_bytes": nbytes,
             "gbs": nbytes / us / 1e3, "of_peak": nbytes / us / 1e3 / peak_gbs}
        )  # fmt: skip
        for r in rows[-5:]:
            print(
                f"{r['gemm']:8s} {r['mode']:12s} {r['us']:8.2f} us {r['gbs']:8.1f} GB/s ({r['of_peak']:.1%})"
            )
    return rows


def executor_rows(frames: int, modes: list[str]):
    """Yields one row per mode as it is measured."""
    for mode in modes:
        config = RuntimeConfig(preset="pi05", device="cuda", **GPU_PRECISION_OPTIONS[mode])
        rng = np.random.default_rng(0)
        observations = [synthetic_observation(config, rng) for _ in range(8)]
        with PipelinedExecutor(config) as executor:
            timings = []
            for i in range(frames + 10):
                chunk = executor.infer(observations[i % len(observations)])
                if i >= 10:
                    timings.append(chunk.timings_ms)
        median = {k: float(np.median([t[k] for t in timings])) for k in timings[0]}
        print(mode, {k: round(v, 2) for k, v in median.items()}, flush=True)
        yield {"mode": mode, "settings": GPU_PRECISION_OPTIONS[mode], "median_ms": median}
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="H200: 4.8 TB/s HBM3e (datasheet)")
    parser.add_argument("--skip-executor", action="store_true")
    parser.add_argument("--skip-gemms", action="store_true")
    parser.add_argument("--modes", default=",".join(EXECUTOR_MODES), help="the executor's, comma-separated")
    args = parser.parse_args()
    doc = {
        **run_header(),
        "peak_gbs": args.peak_gbs,
        "gemm_rows_per_call": ROWS,
        "executor_frames": args.frames,
        "gemms": [] if args.skip_gemms else gemm_rows(args.peak_gbs),
    }
    save(doc, args.out)
    if not args.skip_executor:
        doc["executor"] = []
        for row in executor_rows(args.frames, args.modes.split(",")):
            doc["executor"].append(row)
            save(doc, args.out)


if __name__ == "__main__":
    main()
