"""Stage experiments on a CUDA GPU: variants of one stage side by side, in one process.

Each variant is captured in a CUDA graph exactly as the executor captures it, timed with CUDA events
(median of many replays, warm-up excluded), and its kernels listed from a profile of a few replays (the
same kernel names and counts the executor runs). Also: the GEMM shapes of the prefix and the action
expert, bf16 against FP8, each captured 50 times in a graph so launch gaps do not count.

    python3 benchmarks/stage_experiments.py --out $OUT/experiments.json [--variants a,b,...]

Writes JSON (device, date, versions, commit) so a result can be cited; used to choose the defaults
recorded in runtime/config.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header  # noqa: E402
from torch.profiler import ProfilerActivity, profile
from vla_runtime.graphs import fp8, fp8_geglu
from vla_runtime.runtime.buffers import ShapeProfile, StaticBuffers
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.profiler import fill_random_inputs, kernel_table
from vla_runtime.runtime.stages import CompiledFunctions, StageRunner

# name -> (stage, compile mode: a name, Inductor options or None for Inductor's default; model settings).
# The model is built once with the FP8 prefix and an FP8 copy of the expert; settings choose whether the
# expert's FP8 GEMMs are used, and variants of a stage come in through the runner's public seam (engines at
# construction). Earlier variants that needed hooks in the product were retired (the KV cache written in
# place inside the compiled prefix; the attention bias repeated per grouped head; the expert's norms, casts
# and residuals fused into Triton FP8 GEMMs, commit 3b2855c); their results stay in
# benchmarks/results/*-stage-experiments-*.json.
BF16_EXPERT = {"fp8_expert": False}
VARIANTS = {
    "denoise": ("denoise", None, BF16_EXPERT),
    "denoise-max-autotune": ("denoise", "max-autotune-no-cudagraphs", BF16_EXPERT),
    "denoise-fp8-expert": ("denoise", None, {"fp8_expert": True}),
    "denoise-fp8-expert-two-kernel-geglu": ("denoise", None, {"fp8_expert": True, "fused_geglu": False}),
    "denoise-fp8-expert-inductor-pdl": ("denoise", {"triton.enable_pdl": True}, {"fp8_expert": True}),
    # Inductor's horizontal fusion of independent kernels (the queries' and keys' RoPE of a layer are two)
    # (the product's denoise stage since dce56f7: runtime/stages.py INDUCTOR_OPTIONS; here each variant
    # compiles with its own options only)
    "denoise-fp8-expert-combo-kernels": ("denoise", {"combo_kernels": True}, {"fp8_expert": True}),
    "denoise-fp8-expert-combo-kernels-and-pdl": (
        "denoise",
        {"combo_kernels": True, "triton.enable_pdl": True},
        {"fp8_expert": True},
    ),
    # Inductor tunes its pointwise and reduction kernels' block sizes (the norms, casts, RoPE, softmax)
    "denoise-fp8-expert-coordinate-descent": (
        "denoise",
        {"coordinate_descent_tuning": True},
        {"fp8_expert": True},
    ),
    "denoise-fp8-expert-combo-and-coordinate-descent": (
        "denoise",
        {"combo_kernels": True, "coordinate_descent_tuning": True},
        {"fp8_expert": True},
    ),
    # the output and down projections' 50 activation rows padded to 64 (the product's since this won, fefeae6)
    "denoise-fp8-expert-combo-kernels-padded-rows": (
        "denoise",
        {"combo_kernels": True},
        {"fp8_expert": True, "row_padding": fp8.EXPERT_ROW_PADDING},
    ),
    "denoise-fp8-expert-concatenated-keys": (
        "denoise",
        None,
        {"fp8_expert": True, "concatenated_keys": True},
    ),
    "vision": ("vision", None, {**BF16_EXPERT, "compiled": False}),
    "vision-compiled": ("vision", None, BF16_EXPERT),
    "prefix-fp8": ("prefix", None, BF16_EXPERT),
    "prefix-fp8-two-kernel-geglu": ("prefix", None, {**BF16_EXPERT, "fused_geglu": False}),
    "prefix-fp8-rope-inside": ("prefix", None, {**BF16_EXPERT, "rope_inside": True}),
    "prefix-fp8-max-autotune": ("prefix", "max-autotune-no-cudagraphs", BF16_EXPERT),
}


def apply_settings(model, settings: dict) -> None:
    model.expert.set_quantized(settings["fp8_expert"])
    # the expert's FP8 GEMMs read their rows unpadded unless the variant says (graphs/fp8.py)
    fp8.set_row_padding(model.expert, settings.get("row_padding", {}))
    # The fused FP8 gate/up + GeGLU kernel wherever the model would use it, unless the variant says not.
    fused = settings.get("fused_geglu", True) and fp8_geglu.available("cuda")[0]
    for stack in (model.prefix_lm, model.expert):
        for layer in stack.layers:
            if layer.mlp.gate_up_quant is not None:
                layer.mlp.fused_geglu = fused


def prefix_rope_inside(model):
    """The prefix stage with its RoPE tables computed inside the compiled function, as it was before."""
    fill = torch.compile(model.fill_prefix, dynamic=False)

    def run(d):
        kv, pad = fill(d.image_tokens, d.image_masks, d.tokens, d.token_masks)
        d.kv_cache.copy_(kv)
        d.prefix_mask.copy_(pad)

    return run


def velocity_concatenated_keys(model):
    """The denoising step as it was before the attention workspace: each layer concatenates the prefix
    cache, the suffix keys and the padding into new tensors, and the float32 action head is a GEMM."""
    from vla_runtime.graphs.layers import grouped_attention

    def velocity(workspace, prefix_len, bias, cos, sin, state, x_t, time_cond):
        kv_cache = [layer_kv[..., :prefix_len, :] for layer_kv in workspace]
        hidden = model.suffix_embeddings(state, x_t, time_cond)
        for i, layer in enumerate(model.expert.layers):
            q, k, v, gate = layer.qkv(hidden, cos, sin, time_cond[2 * i])
            pad = k.new_zeros(*k.shape[:2], model.key_padding(prefix_len), k.shape[-1])
            keys = torch.cat([kv_cache[i][0], k, pad], dim=2)
            values = torch.cat([kv_cache[i][1], v, pad], dim=2)
            hidden = layer.finish(
                hidden, grouped_attention(q, keys, values, bias), gate, time_cond[2 * i + 1]
            )
        out, _ = model.expert.norm(hidden, time_cond[-1])
        return model.action_out_proj(out[:, -x_t.shape[1] :].float())

    return velocity


def denoise_with(model, velocity, steps: int):
    """A denoise engine running `velocity` (compiled here) for each step."""
    from vla_runtime.graphs.pi0 import time_schedule

    times, dt = time_schedule(steps)
    times = torch.from_numpy(times).to(next(model.parameters()).device)
    with torch.inference_mode():
        conds = model.step_conditioning(times, 1)
    compiled = torch.compile(velocity, dynamic=False)

    def run(d):
        d.actions.copy_(
            model.denoise(d.kv_cache, d.prefix_mask, d.state, d.noise, times, dt, conds, compiled)
        )

    return run


def time_graph(run, stream, repeats=100, warmup=10) -> list[float]:
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def kernels_of_replays(run, stream, repeats=5, top=30) -> dict:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.cuda.stream(stream):
            for _ in range(repeats):
                run()
        torch.cuda.synchronize()
    return kernel_table(prof.key_averages(), repeats, top)


def run_variant(parts, name, stage, mode, settings, steps):
    """A variant captured and timed (its kernels are listed later, `kernels_of_replays`)."""
    apply_settings(parts.model, settings)
    cfg = parts.config.model
    buffers = StaticBuffers(
        cfg, ShapeProfile(cfg.num_views, cfg.max_token_len, steps), parts.device, parts.model.compute_dtype
    )
    for slot in buffers.device_slots:
        fill_random_inputs(slot, prompt_tokens=200)
    engines = {}
    if settings.get("rope_inside"):
        engines["prefix"] = prefix_rope_inside(parts.model)
    if settings.get("concatenated_keys"):
        engines["denoise"] = denoise_with(parts.model, velocity_concatenated_keys(parts.model), steps)
    runner = StageRunner(
        parts.model,
        buffers,
        parts.device,
        compile_stages=(stage,) if settings.get("compiled", True) else (),
        # Inductor's options are the variant's alone (its `mode`, below), not the product's by stage: the
        # plain variants are the loop without them, as the earlier runs measured it
        compiled=CompiledFunctions(options={}),
        engines=engines,
    )
    stream = torch.cuda.Stream()
    started = time.perf_counter()
    # A compile mode is Inductor's configuration while the stage compiles (during capture's warm-up).
    if isinstance(mode, dict):
        options = mode
    else:
        options = torch._inductor.list_mode_options(mode) if mode else {}
    with torch._inductor.config.patch(options):
        runner.capture({stage: stream}, {stage: torch.cuda.graph_pool_handle()}, stages=(stage,))
    setup_s = time.perf_counter() - started
    replay = lambda: runner.run(stage, 0)  # noqa: E731
    times = time_graph(replay, stream)
    row = {
        "name": name,
        "stage": stage,
        "compile_mode": str(mode) if mode else "default",
        "precision": parts.config.precision,
        "settings": settings,
        "setup_s": setup_s,
        "median_ms": float(np.median(times)),
        "p99_ms": float(np.percentile(times, 99)),
        "n": len(times),
    }
    return row, runner, replay, stream


def op_time_us(op, repeats_in_graph: int) -> float:
    """One op's time: `repeats_in_graph` back-to-back calls captured in a CUDA graph, so launch gaps do not
    count; median of 20 replays."""
    for _ in range(3):  # warm-up outside capture: cuBLAS handles, heuristics
        op()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats_in_graph):
            op()
    times = time_graph(graph.replay, torch.cuda.current_stream(), repeats=20, warmup=3)
    return float(np.median(times)) * 1e3 / repeats_in_graph


def gemm_rates(shapes, repeats_in_graph=50) -> list[dict]:
    """Each shape as a graph of `repeats_in_graph` back-to-back GEMMs: bf16 F.linear and FP8 _scaled_mm."""
    rows = []
    one = torch.ones((), device="cuda")
    for label, m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t()
        ops = {
            "bf16": lambda: torch.nn.functional.linear(x, w),  # noqa: B023
            "fp8": lambda: torch._scaled_mm(x8, w8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),  # noqa: B023
        }
        row = {"label": label, "m": m, "n": n, "k": k}
        for kind, op in ops.items():
            us = op_time_us(op, repeats_in_graph)
            row[f"{kind}_us"] = us
            row[f"{kind}_tflops"] = 2 * m * n * k / (us * 1e-6) / 1e12
            row[f"{kind}_weight_GBps"] = n * k * (2 if kind == "bf16" else 1) / (us * 1e-6) / 1e9
        rows.append(row)
    return rows


def vision_gemm_rates(cfg, repeats_in_graph=50) -> list[dict]:
    """SigLIP's four GEMMs at 3 views (768 rows) as the tower runs them (fp16, with bias) and variants:
    bf16, no bias epilogue, and the MLP width padded from 4304 to a multiple of 128."""
    rows = cfg.num_views * cfg.vision.tokens_per_image
    width, mlp = cfg.vision.width, cfg.vision.mlp_dim
    padded = -(-mlp // 128) * 128
    shapes = [("qkv", 3 * width, width), ("out", width, width), ("fc1", mlp, width), ("fc2", width, mlp)]
    shapes += [("fc1 padded", padded, width), ("fc2 padded", width, padded)]
    results = []
    for label, n, k in shapes:
        row = {"label": label, "m": rows, "n": n, "k": k}
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
            b = torch.randn(n, device="cuda", dtype=dtype)
            for bias in (True, False):
                op = lambda: torch.nn.functional.linear(x, w, b if bias else None)  # noqa: B023, E731
                us = op_time_us(op, repeats_in_graph)
                key = f"{str(dtype).split('.')[-1]}{'_bias' if bias else ''}"
                row[f"{key}_us"] = us
                row[f"{key}_tflops"] = 2 * rows * n * k / (us * 1e-6) / 1e12
        results.append(row)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments.json")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gemms", action="store_true")
    ap.add_argument("--vision-gemms", action="store_true")
    ap.add_argument("--expert-rows", type=lambda v: [int(x) for x in v.split(",")], default=[])
    ap.add_argument("--accuracy", action="store_true", help="accuracy gates with and without the FP8 expert")
    args = ap.parse_args()
    out = Path(args.out)
    result = {
        **run_header(),
        "cuda": torch.version.cuda,
        "workload": "pi05, 3 views, 200-token prompt, random weights",
        "variants": [],
    }

    def save():
        out.write_text(json.dumps(result, indent=2))

    config = RuntimeConfig(preset="pi05", device="cuda", precision="fp8", fp8_expert=True)
    parts = build_parts(config)
    if args.accuracy:
        from vla_runtime.runtime.accuracy import accuracy_table, float32_reference

        reference = float32_reference(config)
        result["accuracy"] = {}
        for label, settings in (("fp8 prefix", BF16_EXPERT), ("fp8 prefix + expert", {"fp8_expert": True})):
            apply_settings(parts.model, settings)
            table = accuracy_table(config, frames=2, seed=1, reference=reference, candidate=parts)
            summary = {
                "passed": table["passed"],
                "actions": next(r for r in table["rows"] if r["name"] == "actions"),
                "kv_min_cosine": min(r["cosine"] for r in table["rows"] if r["name"].startswith("prefix.")),
            }
            result["accuracy"][label] = summary
            print(label, json.dumps(summary), flush=True)
        del reference
        torch.cuda.empty_cache()
        save()
    if args.gemms:
        cfg = parts.config.model
        lm, ex = cfg.prefix_lm, cfg.expert
        p, s = cfg.prefix_len, cfg.suffix_len
        shapes = [
            ("prefix qkv", p, (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim, lm.width),
            ("prefix o", p, lm.width, lm.num_heads * lm.head_dim),
            ("prefix gate_up", p, 2 * lm.mlp_dim, lm.width),
            ("prefix down", p, lm.width, lm.mlp_dim),
            *[
                shape
                for rows in sorted({s, *args.expert_rows})  # does padding the 50 rows help cuBLAS?
                for shape in (
                    (
                        f"expert qkv m{rows}",
                        rows,
                        (ex.num_heads + 2 * ex.num_kv_heads) * ex.head_dim,
                        ex.width,
                    ),
                    (f"expert o m{rows}", rows, ex.width, ex.num_heads * ex.head_dim),
                    (f"expert gate_up m{rows}", rows, 2 * ex.mlp_dim, ex.width),
                    (f"expert down m{rows}", rows, ex.width, ex.mlp_dim),
                )
            ],
            ("square 8192", 8192, 8192, 8192),
        ]
        result["gemms"] = gemm_rates(shapes)
        save()
        for r in result["gemms"]:
            print(
                f"{r['label']:16s} bf16 {r['bf16_us']:8.2f} us  fp8 {r['fp8_us']:8.2f} us  "
                f"fp8 {r['fp8_tflops']:7.1f} TFLOP/s",
                flush=True,
            )
    if args.vision_gemms:
        result["vision_gemms"] = vision_gemm_rates(parts.config.model)
        save()
        for r in result["vision_gemms"]:
            cells = "  ".join(f"{k[:-3]} {v:6.2f}" for k, v in r.items() if k.endswith("_us"))
            print(f"vision {r['label']:11s} {r['n']:5d}x{r['k']:<5d} us: {cells}", flush=True)
    # Every variant is captured and timed before any is profiled: after a profiler session a graph's replay
    # may stay slower in that process (2026-12-01, 9430954: the kernel time of the loop as it is, 7.14 ms,
    # unchanged from the first variant to the last, while its graph's median rose from 7.91 to 9.31 ms,
    # each variant timed after the one before was profiled). The first variant is timed again at the end
    # of the timing, so a drift without the profiler shows too.
    timed = []  # (row, runner, replay, stream) of each variant that captured
    for name in (n for n in args.variants.split(",") if n):
        stage, mode, options = VARIANTS[name]
        torch._dynamo.reset()  # compiled code of an earlier variant must not be reused under another mode
        try:
            row, runner, replay, stream = run_variant(parts, name, stage, mode, options, args.steps)
        except Exception as exc:  # one failed variant must not lose the others' results
            row = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(name, "ERROR", row["error"][:500], flush=True)
        else:
            timed.append((row, runner, replay, stream))
            print(f"== {name}: {row['median_ms']:.3f} ms median, setup {row['setup_s']:.0f} s", flush=True)
        result["variants"].append(row)
        save()
    if timed:
        first, _, replay, stream = timed[0]
        first["median_ms_again_after_all"] = float(np.median(time_graph(replay, stream)))
        print(f"== {first['name']} again: {first['median_ms_again_after_all']:.3f} ms median", flush=True)
    for row, _, replay, stream in timed:
        row.update(kernels_of_replays(replay, stream))
        save()
        print(
            f"== {row['name']}: {row['ops_per_call']:.0f} kernels, {row['total_ms']:.3f} ms of kernels",
            flush=True,
        )
        for k in row["top"][:20]:
            print(
                f"   {k['ms']:7.3f} ms x{k['calls']:<6.0f} {1e3 * k['ms'] / max(k['calls'], 1):6.2f} us  "
                f"{k['name'][:100]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
