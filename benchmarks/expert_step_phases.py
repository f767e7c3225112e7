"""Where the fused expert step's time goes (graphs/expert_step.py), on a CUDA GPU.

The kernel's grid barrier alone (1000 in a launch, with and without the full fences of the first
version). Then for pi05 (horizon 50, batch 1) and the LIBERO shape (horizon 10, batches 1 and 4), every
FP8 option, random weights, a random frame: the step alone, 100 calls captured in a CUDA graph (CUDA
events, median of 20 replays after warm-up), and each phase's time from block 0's clock after each grid
barrier (median over 20 eager calls, summed over the layers).

    python3 benchmarks/expert_step_phases.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from results_doc import run_header
from vla_runtime.graphs.expert_step import ExpertStep, barrier_us
from vla_runtime.graphs.pi0 import time_schedule
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.loading import build_parts

CASES = [(None, (1,)), (10, (1, 4))]  # action horizon (None: pi05's 50), batch sizes


def step_inputs(model, batch: int, generator: torch.Generator):
    """The fused op's inputs for the first denoising step of a random frame."""
    cfg, device = model.cfg, next(model.parameters()).device
    e, p = cfg.expert, cfg.prefix_len
    kv = torch.randn(e.depth, 2, batch, 1, p, e.head_dim, generator=generator, device=device)
    mask = torch.ones(batch, p, dtype=torch.bool, device=device)
    mask[:, p - 100 :] = False  # a short prompt
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=generator, device=device)
    times, _ = time_schedule(10)
    mods = model.step_conditioning(torch.from_numpy(times).to(device), batch)[0]
    hidden = model.suffix_embeddings(None, noise, mods)
    bias, cos, sin = model.suffix_attention(mask)
    return hidden, mods, kv.to(model.compute_dtype), bias, cos, sin


def graph_time_ms(fn, calls: int = 100, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        times = []
        for _ in range(replays + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    return statistics.median(times[3:])


@torch.inference_mode()
def main(out: str) -> None:
    result = {**run_header(), "cuda": torch.version.cuda, "cases": []}
    result["barrier_us"] = {
        "release_acquire": barrier_us("cuda"),  # as the kernel has it
        "with_full_fences": barrier_us("cuda", fences=True),  # the first version's
    }
    print(json.dumps(result["barrier_us"]), flush=True)
    for horizon, batches in CASES:
        overrides = {"action_horizon": horizon} if horizon else {}
        config = RuntimeConfig(
            preset="pi05", device="cuda", precision="fp8", vision_precision="fp16", fp8_expert=True,
            compile_cache="none", **overrides,
        )  # fmt: skip
        model = build_parts(config).model
        step = ExpertStep(model)
        generator = torch.Generator(device="cuda").manual_seed(0)
        for batch in batches:
            inputs = step_inputs(model, batch, generator)
            phases = [step.phase_times_us(*inputs) for _ in range(23)][3:]
            per_phase = {
                name: statistics.median(sum(call[name]) for call in phases) for name in phases[0]
            }  # summed over the layers, median over the calls
            case = {
                "horizon": model.cfg.action_horizon,
                "batch": batch,
                "rows": batch * model.cfg.suffix_len,
                "step_ms_in_graph": graph_time_ms(lambda inputs=inputs, step=step: step(*inputs)),
                "phases_us_per_step": per_phase,
                "phases_sum_us": sum(per_phase.values()),
            }
            result["cases"].append(case)
            print(json.dumps(case), flush=True)
        del model, step
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
