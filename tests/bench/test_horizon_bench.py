"""pi05 with the horizon of openpi's pi05_libero (10 actions) next to the default 50, measured in one run:
the pipelined executor from `submit` to the chunk, bf16 and with every FP8 option. The expert's suffix is
the horizon's length, so the denoising loop is where the two differ."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor

from ..conftest import random_observation
from .conftest import record

STAGES = ("vision", "prefix", "denoise")
MODES = {
    "bf16": {"precision": "bf16"},
    "fp8-all": {"precision": "fp8", "fp8_expert": True, "vision_precision": "fp16"},
}


DENOISE_MS: dict[tuple[str, int], float] = {}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("horizon", [50, 10])
def test_latency_by_horizon(benchmark, cuda, mode, horizon):
    config = RuntimeConfig(preset="pi05", device="cuda", action_horizon=horizon, **MODES[mode])
    rng = np.random.default_rng(0)
    frames = [random_observation(rng, "pi05", side=224) for _ in range(8)]
    with PipelinedExecutor(config, profiles=None) as executor:
        chunks, submit_to_chunk_ms = [], []
        counter = iter(range(10**9))

        def one():
            start = time.perf_counter()
            chunks.append(executor.submit(frames[next(counter) % len(frames)]).result())
            submit_to_chunk_ms.append((time.perf_counter() - start) * 1e3)

        benchmark.pedantic(one, rounds=210, iterations=1)
        chunks, submit_to_chunk_ms = chunks[10:], submit_to_chunk_ms[10:]  # warm-up excluded
    assert all(c.actions.shape == (horizon, 7) for c in chunks)
    stages = {s: float(np.median([c.timings_ms[s] for c in chunks])) for s in STAGES}
    row = record(
        f"pi05-h{horizon}-{mode}",
        "pipelined",
        submit_to_chunk_ms,  # what the caller waits: submit() to the chunk in hand
        stages,
        precision=mode,
        action_horizon=horizon,
        engine_total_ms_p50=float(np.median([c.timings_ms["total"] for c in chunks])),
    )
    print(f"horizon {horizon} {mode}: p50 {row['latency_ms']['p50']:.2f} ms, stages {stages}")
    DENOISE_MS[(mode, horizon)] = stages["denoise"]
    if (mode, 50) in DENOISE_MS and (mode, 10) in DENOISE_MS:  # fewer actions, no slower (same run)
        assert DENOISE_MS[(mode, 10)] <= DENOISE_MS[(mode, 50)] * 1.05
    gc.collect()
    torch.cuda.empty_cache()
