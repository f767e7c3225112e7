"""Captured graphs without pipelining: the three stage graphs replayed back to back on one stream.

The middle rung between the eager reference and the pipelined executor, for benchmarks and for users who
want graph speed with no threads.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .buffers import ShapeProfile, StaticBuffers
from .config import RuntimeConfig
from .handover import PreviousChunk
from .inputs import place_raw_images
from .loading import PolicyParts, build_parts
from .policy import Policy
from .stages import STAGES, StageRunner
from .types import ActionChunk, Observation


class GraphPolicy(Policy):
    def __init__(self, config: RuntimeConfig | None = None, parts: PolicyParts | None = None):
        self.parts = parts or build_parts(config or RuntimeConfig())
        self.config = self.parts.config
        device = self.parts.device
        if device.type != "cuda":
            raise ValueError("device: GraphPolicy needs CUDA (use EagerPolicy on the CPU)")
        cfg = self.config.model
        profile = ShapeProfile(cfg.num_views, cfg.max_token_len, self.config.denoising_steps)
        self.runner = StageRunner(
            self.parts.model,
            StaticBuffers(cfg, profile, device, self.parts.model.compute_dtype),
            device,
            self.config.use_compile,
            compile_scope=self.config.compile_scope,
            handover=self.config.handover_settings,
        )
        self.stream = torch.cuda.Stream(device)
        self.runner.capture(
            {stage: self.stream for stage in STAGES},
            {stage: torch.cuda.graph_pool_handle() for stage in STAGES},
        )
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        self._rng = self.config.noise_generator()

    def reset(self) -> None:
        pass

    @torch.inference_mode()
    def infer(
        self, obs: Observation, noise: np.ndarray | None = None, previous: PreviousChunk | None = None
    ) -> ActionChunk:
        start = time.perf_counter()
        inputs = self.parts.preparer(obs)
        previous, handover = self.parts.prepare_handover(previous)
        cfg = self.config.model
        noise = (
            self.parts.check_noise(noise)
            if noise is not None
            else self._rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        )
        host, slot = self.runner.buffers.host_ring[0], self.runner.buffers.device_slots[0]
        staged = {
            "pixels": inputs.pixels,
            "image_masks": inputs.image_masks,
            "tokens": inputs.tokens,
            "token_masks": inputs.token_masks,
            "state": inputs.state,
            "noise": noise,
            "handover": handover.packed,
        }
        ev = self.events
        with torch.cuda.stream(self.stream):
            ev[0].record()
            for name, array in staged.items():
                host.inputs[name].numpy()[0] = array
                slot.input(name).copy_(host.inputs[name], non_blocking=True)
            place_raw_images(slot.input("pixels")[0], inputs.raw_images)
            ev[1].record()
            for i, stage in enumerate(STAGES):
                self.runner.run(stage, 0)
                ev[2 + i].record()
            host.actions.copy_(slot.actions, non_blocking=True)
        self.stream.synchronize()  # a spinning wait whatever `device_wait` says: the executor's setting
        timings = {
            "copy_in": ev[0].elapsed_time(ev[1]),
            "vision": ev[1].elapsed_time(ev[2]),
            "prefix": ev[2].elapsed_time(ev[3]),
            "denoise": ev[3].elapsed_time(ev[4]),
        }
        finished = self.parts.finish_chunk(host.actions[0].numpy().copy(), previous)
        timings["total"] = (time.perf_counter() - start) * 1e3
        return ActionChunk(
            timestamp=obs.timestamp,
            timings_ms=timings,
            steps=self.runner.profile.steps,
            model_id=self.parts.model_id,
            random_weights=self.parts.random_weights,
            **finished,
        )
