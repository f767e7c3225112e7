"""Does reading the next layer's weights into L2 ahead of time pay in the denoising loop? An experiment on
a CUDA GPU.

The loop's FP8 GEMMs take 3.9-6.0 us in place against 3.5-5.2 us for the same GEMMs back to back on
weights already in L2 (docs/performance.md): each layer's 17 MB of FP8 weights come from DRAM, one kernel
after another, each paying DRAM's latency on its first tiles. Here, as a layer's first GEMM is about to
run, a small kernel on a side stream reads the next layer's weights (and its attention workspace) with
loads that ask L2 to keep them (evict_last), while the main stream computes; the step joins the side
stream at its end. 17 MB per layer, two layers at a time, fit the H200's 60 MB L2.

The variant is the denoise stage's velocity written out (as stage_experiments' concatenated-keys variant
is) with the prefetch between each layer's input norm and its q/k/v GEMM; everything else is the model's
own code. Both variants are captured as the executor captures them, checked to give the same actions on
the same inputs, then timed alternately (A B A B ...), median of 50 replays each time, so a drift within
the run (10% in the split-K run) falls on both.

    python3 benchmarks/l2_prefetch_experiment.py --out $OUT/l2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl
from results_doc import run_header, save  # noqa: E402
from vla_runtime.graphs.layers import apply_rope, grouped_attention
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.loading import build_parts

sys.path.insert(0, str(Path(__file__).parent))
from stage_experiments import VARIANTS, denoise_with, run_variant, time_graph  # noqa: E402

MAX_TENSORS = 6
PROGRAMS_PER_TENSOR = 8
BLOCK = 2048  # int32 words a program reads per iteration (8 KB)


@triton.jit
def _touch_kernel(
    p0,
    n0,
    p1,
    n1,
    p2,
    n2,
    p3,
    n3,
    p4,
    n4,
    p5,
    n5,  # int32 views of the tensors, and their lengths
    sink,
    flag,  # always 0: the store below never happens, but the compiler cannot know it
    PROGRAMS_PER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    which = pid // PROGRAMS_PER
    part = pid % PROGRAMS_PER
    ptr, n = p0, n0
    if which == 1:
        ptr, n = p1, n1
    if which == 2:
        ptr, n = p2, n2
    if which == 3:
        ptr, n = p3, n3
    if which == 4:
        ptr, n = p4, n4
    if which == 5:
        ptr, n = p5, n5
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(part * BLOCK, n, PROGRAMS_PER * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc = acc | tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    if flag != 0:
        tl.store(sink + pid, tl.sum(acc))


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


@torch.library.custom_op("vla_experiment::l2_prefetch", mutates_args=("token",))
def l2_prefetch(token: torch.Tensor, after: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Read `tensors` into L2 on a side stream, once `after` is computed on the current one."""
    main = torch.cuda.current_stream(token.device)
    side = _side_stream(token.device)
    side.wait_stream(main)
    words = [t.reshape(-1).view(torch.int32) for t in tensors]
    words += [words[0][:0]] * (MAX_TENSORS - len(words))
    args = [a for w in words for a in (w, w.numel())]
    with torch.cuda.stream(side):
        _touch_kernel[(MAX_TENSORS * PROGRAMS_PER_TENSOR,)](
            *args, token, 0, PROGRAMS_PER=PROGRAMS_PER_TENSOR, BLOCK=BLOCK, num_warps=4
        )


@l2_prefetch.register_fake
def _(token, after, tensors):
    return None


@torch.library.custom_op("vla_experiment::l2_join", mutates_args=("token",))
def l2_join(token: torch.Tensor, after: torch.Tensor) -> None:
    """The current stream waits for the side stream's prefetches (a captured graph must rejoin it)."""
    torch.cuda.current_stream(token.device).wait_stream(_side_stream(token.device))


@l2_join.register_fake
def _(token, after):
    return None


def velocity_prefetching(model):
    """PI0Model.velocity with, in each layer, the next layer's weights and attention workspace read into L2
    on a side stream between the layer's input norm and its q/k/v GEMM."""
    layers = model.expert.layers
    token = torch.zeros(
        MAX_TENSORS * PROGRAMS_PER_TENSOR, dtype=torch.int32, device=next(model.parameters()).device
    )
    weights = [
        [
            g.weight_fp8.t()
            for g in (lr.self_attn.qkv_quant, lr.self_attn.o_quant, lr.mlp.gate_up_quant, lr.mlp.down_quant)
        ]
        for lr in layers
    ]

    def layer_prefetching(layer, hidden, cos, sin, mod_in, mod_post, layer_kv, prefix_len, bias, ahead):
        """graphs/pi0.py's expert_layer with GemmaDecoderLayer.qkv written out around the prefetch."""
        normed, gate = layer.input_layernorm(hidden, mod_in)
        attn = layer.self_attn
        b, t, _ = hidden.shape
        x8 = attn.qkv_quant.quantize(normed)
        l2_prefetch(token, x8, ahead)
        kv = attn.num_kv_heads * attn.head_dim
        q, k, v = attn.qkv_quant.matmul(x8, normed.shape[:-1]).split(
            [attn.num_heads * attn.head_dim, kv, kv], -1
        )
        q = apply_rope(q.reshape(b, t, attn.num_heads, attn.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, attn.num_kv_heads, attn.head_dim), cos, sin).transpose(1, 2)
        v = v.reshape(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        layer_kv[:, :, :, prefix_len : prefix_len + k.shape[2]] = torch.stack([k, v])
        return layer.finish(hidden, grouped_attention(q, layer_kv[0], layer_kv[1], bias), gate, mod_post)

    def velocity(workspace, prefix_len, bias, cos, sin, state, x_t, time_cond):
        hidden = model.suffix_embeddings(state, x_t, time_cond)
        for i, layer in enumerate(layers):
            following = (i + 1) % len(layers)
            ahead = weights[following] + [workspace[following]]
            hidden = layer_prefetching(
                layer,
                hidden,
                cos,
                sin,
                time_cond[2 * i],
                time_cond[2 * i + 1],
                workspace[i],
                prefix_len,
                bias,
                ahead,
            )
        out = model._velocity_head(hidden, time_cond, x_t.shape[1])
        l2_join(token, out)
        return out

    return velocity


def alternate(runs: dict, stream, rounds: int = 6, repeats: int = 50) -> dict[str, list[float]]:
    medians = {name: [] for name in runs}
    for _ in range(rounds):
        for name, replay in runs.items():
            medians[name].append(float(np.median(time_graph(replay, stream, repeats=repeats, warmup=5))))
    return medians


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("l2.json"))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    doc = {**run_header(), "cuda": torch.version.cuda, "variants": []}
    parts = build_parts(RuntimeConfig(preset="pi05", device="cuda", precision="fp8", fp8_expert=True))
    stage, mode, settings = VARIANTS["denoise-fp8-expert"]
    runners = {}
    for name, engines in (
        ("as it is", None),
        (
            "l2 prefetch",
            {"denoise": denoise_with(parts.model, velocity_prefetching(parts.model), args.steps)},
        ),
    ):
        row, runner = run_variant(parts, name, stage, mode, settings, args.steps, engines)
        doc["variants"].append(row)
        runners[name] = runner
        print(
            f"{name:12s} {row['median_ms']:.3f} ms, {row['ops_per_call']:.0f} kernels, kernel time "
            f"{row['total_ms']:.3f} ms",
            flush=True,
        )
        save(doc, args.out)
    # The same inputs in both: the actions must agree (the prefetch changes no arithmetic).
    first, second = (r.buffers.device_slots[0] for r in runners.values())
    first.kv_cache.normal_()
    first.prefix_mask.fill_(True)
    for name in ("kv_cache", "prefix_mask", "state", "noise"):
        getattr(second, name).copy_(getattr(first, name))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for runner in runners.values():
            runner.run("denoise", 0)
    stream.synchronize()
    difference = float((first.actions - second.actions).abs().max())
    doc["max_abs_difference"] = difference
    print(
        f"actions: largest difference {difference:.3e} (scale {float(first.actions.abs().max()):.3f})",
        flush=True,
    )
    doc["alternating_medians_ms"] = alternate(
        {n: (lambda r=r: r.run("denoise", 0)) for n, r in runners.items()}, stream
    )
    save(doc, args.out)
    for name, values in doc["alternating_medians_ms"].items():
        print(f"{name:12s} " + " ".join(f"{v:.3f}" for v in values) + f"  median {np.median(values):.3f} ms")


if __name__ == "__main__":
    main()
