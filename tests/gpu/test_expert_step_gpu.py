"""The fused expert step (graphs/expert_step.py: every expert layer of a denoising step in one persistent
CUDA kernel) against the unfused FP8 expert it replaces and against the bf16 expert, on full pi05 with
fresh random weights, calibrated FP8 scales and fresh random inputs; and inside the executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from vla_runtime.graphs.expert_step import ExpertStep
from vla_runtime.graphs.pi0 import time_schedule
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fp8_parts(cuda, **overrides):
    seed = int(np.random.default_rng().integers(2**31))
    config = RuntimeConfig(
        preset="pi05", device="cuda", precision="fp8", vision_precision="fp16", fp8_expert=True, seed=seed,
        compile_cache="none", **overrides,
    )  # fmt: skip
    return build_parts(config), seed


def random_frame(model, batch: int, generator: torch.Generator):
    """A prefix cache, its mask (the prompt's tail padded out, as short instructions are), noise."""
    cfg, device = model.cfg, next(model.parameters()).device
    e, p = cfg.expert, cfg.prefix_len
    kv = torch.randn(e.depth, 2, batch, e.num_kv_heads, p, e.head_dim, generator=generator, device=device).to(
        model.compute_dtype
    )
    mask = torch.ones(batch, p, dtype=torch.bool, device=device)
    for b in range(batch):
        mask[b, p - int(torch.randint(1, 150, (1,), generator=generator, device=device)) :] = False
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=generator, device=device)
    return kv, mask, noise


def denoise(model, kv, mask, noise, steps: int = 10):
    times, dt = time_schedule(steps)
    times = torch.from_numpy(times).to(noise.device)
    conds = model.step_conditioning(times, noise.shape[0])
    return model.denoise(kv, mask, None, noise, times, dt, conds)


@pytest.mark.parametrize("horizon, batches", [(None, (1,)), (10, (1, 4, 6))])
@torch.inference_mode()
def test_the_fused_step_matches_the_unfused_fp8_expert(cuda, horizon, batches):
    parts, seed = fp8_parts(cuda, **({"action_horizon": horizon} if horizon else {}))
    model = parts.model
    fused = ExpertStep(model)
    generator = torch.Generator(device=cuda).manual_seed(seed)
    for batch in batches:
        kv, mask, noise = random_frame(model, batch, generator)
        model.expert_step = None
        unfused = denoise(model, kv, mask, noise)
        model.expert.set_quantized(False)
        bf16 = denoise(model, kv, mask, noise)
        model.expert.set_quantized(True)
        model.expert_step = fused
        assert model.uses_expert_step(batch)
        actions = denoise(model, kv, mask, noise)
        model.expert_step = None
        err_fused, err_unfused = rel_l2(actions, bf16), rel_l2(unfused, bf16)
        print(
            f"\nseed {seed} horizon {model.cfg.action_horizon} batch {batch}: rel L2 fused vs unfused "
            f"{rel_l2(actions, unfused):.2e}; vs the bf16 expert: fused {err_fused:.2e}, "
            f"unfused {err_unfused:.2e}"
        )
        assert torch.isfinite(actions).all()
        # The kernel rounds where the unfused path writes bf16 and sums in another order: its actions stay
        # as close to the bf16 expert's as the unfused FP8 path's are, and close to those.
        assert rel_l2(actions, unfused) < 2e-2, f"seed {seed}"
        assert err_fused <= 1.25 * err_unfused + 2e-3, f"seed {seed}"


@torch.inference_mode()
def test_too_many_rows_fall_back_to_the_unfused_layers(cuda):
    parts, seed = fp8_parts(cuda)
    model = parts.model
    model.expert_step = ExpertStep(model)
    assert model.uses_expert_step(1) and not model.uses_expert_step(2)  # 2 x 50 rows > 64
    generator = torch.Generator(device=cuda).manual_seed(seed)
    kv, mask, noise = random_frame(model, 2, generator)
    with_step = denoise(model, kv, mask, noise)
    model.expert_step = None
    assert torch.equal(with_step, denoise(model, kv, mask, noise))


def test_the_executor_serves_through_the_fused_step(cuda):
    executor = PipelinedExecutor(
        RuntimeConfig(
            preset="pi05", device="cuda", precision="fp8", vision_precision="fp16", fp8_expert=True,
            expert_step=True,
        )
    )  # fmt: skip
    model = executor.parts.model
    assert model.uses_expert_step(1)
    rng = np.random.default_rng()
    frames = [
        (random_observation(rng, "pi05", side=224), rng.standard_normal((50, 32), dtype=np.float32))
        for _ in range(5)
    ]
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            executor.infer(*frames[0])
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        assert any("expert_step_kernel" in n for n in names), names[:20]
        served = [executor.infer(obs, noise).actions for obs, noise in frames]
    finally:
        executor.close()
    # The reference: the same FP8 weights and scales, unfused, eager (after the executor is closed, so
    # that nothing it might still capture sees the model without the fused step).
    model.expert_step = None
    reference = EagerPolicy(parts=executor.parts)
    worst = 0.0
    for (obs, noise), a in zip(frames, served, strict=True):
        b = reference.infer(obs, noise).actions
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    print(f"fused-step executor vs unfused fp8 eager: worst relative difference {worst:.2e}")
    assert worst <= 5e-2
