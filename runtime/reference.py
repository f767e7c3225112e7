"""The eager reference policy: the three stages run one after another, no graphs, no streams.

It defines what the right actions are; the pipelined executor must agree with it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..graphs.pi0 import time_schedule
from .config import RuntimeConfig
from .handover import PreviousChunk
from .inputs import pixels_to_model_input
from .loading import PolicyParts, build_parts
from .policy import Policy
from .types import ActionChunk, Observation


class EagerPolicy(Policy):
    def __init__(self, config: RuntimeConfig | None = None, parts: PolicyParts | None = None):
        self.parts = parts or build_parts(config or RuntimeConfig())
        self.config = self.parts.config
        self.steps = self.config.denoising_steps
        times, self.dt = time_schedule(self.steps)
        self.host_times = times.tolist()
        self.times = torch.from_numpy(times).to(self.parts.device)
        self._rng = self.config.noise_generator()
        self.guidance = self.config.handover_settings.guidance(times)
        with torch.no_grad():  # not inference mode: the rtc loop differentiates through the expert
            self.step_conds = self.parts.model.step_conditioning(self.times, 1)

    def reset(self) -> None:
        pass

    def _sync(self) -> float:
        if self.parts.device.type == "cuda":
            torch.cuda.synchronize(self.parts.device)
        return time.perf_counter()

    @torch.inference_mode()
    def infer(
        self, obs: Observation, noise: np.ndarray | None = None, previous: PreviousChunk | None = None
    ) -> ActionChunk:
        parts, model, device = self.parts, self.parts.model, self.parts.device
        received = self._sync()
        inputs = parts.preparer(obs)
        previous, handover = parts.prepare_handover(previous)
        noise = (
            parts.check_noise(noise)
            if noise is not None
            else self._rng.standard_normal(
                (self.config.model.action_horizon, self.config.model.action_dim), dtype=np.float32
            )
        )
        t0 = self._sync()
        pixels = inputs.pixels_on(device)[None]
        image_masks = torch.from_numpy(inputs.image_masks)[None].to(device)
        tokens = torch.from_numpy(inputs.tokens)[None].to(device)
        token_masks = torch.from_numpy(inputs.token_masks)[None].to(device)
        state = torch.from_numpy(inputs.state)[None].to(device)
        noise_t = torch.from_numpy(noise)[None].to(device)
        handover_t = torch.from_numpy(handover.packed)[None].to(device)
        t1 = self._sync()
        image_tokens = model.encode_images(pixels_to_model_input(pixels))
        t2 = self._sync()
        kv, prefix_mask = model.fill_prefix(image_tokens, image_masks, tokens, token_masks)
        t3 = self._sync()
        if self.config.handover_settings.guided:
            args = (kv, prefix_mask, state, noise_t, self.host_times, self.dt, self.step_conds)
            actions = model.denoise_guided(*args, handover_t, self.guidance)
        else:
            actions = model.denoise(kv, prefix_mask, state, noise_t, self.times, self.dt, self.step_conds)
        t4 = self._sync()
        actions = actions[0].float().cpu().numpy()
        t5 = time.perf_counter()
        ms = lambda a, b: (b - a) * 1e3  # noqa: E731
        timings = {
            "prepare": ms(received, t0),
            "copy_in": ms(t0, t1),
            "vision": ms(t1, t2),
            "prefix": ms(t2, t3),
            "denoise": ms(t3, t4),
            "copy_out": ms(t4, t5),
            "total": ms(received, t5),
        }
        return ActionChunk(
            timestamp=obs.timestamp,
            timings_ms=timings,
            steps=self.steps,
            model_id=parts.model_id,
            random_weights=parts.random_weights,
            **parts.finish_chunk(actions, previous),
        )
