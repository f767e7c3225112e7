"""The pi0 / pi0.5 policy network, split into its three stage graphs.

    vision   : pixels [B, V, 3, H, W]            -> image tokens [B, V*T, D_lm]
    prefix   : image tokens + prompt tokens        -> KV cache [depth, 2, B, Hkv, P, Dh], prefix mask [B, P]
    denoise  : KV cache + noise (+ state for pi0)  -> actions [B, horizon, action_dim]   (k Euler steps)

Every stage is a static-shape function of tensors: no host synchronisation, no data-dependent Python
control flow, so each can be captured whole in a CUDA graph. `sample_actions_uncached` is the
reference that the split must equal: at each step it runs prefix and suffix in one attention pass
with the joint mask, as openpi's training forward does, with no KV cache.

Semantics follow openpi's PI0Pytorch: prefix-LM mask with a causal boundary before the suffix,
positions = cumsum(valid) - 1, flow matching from t=1 (noise) to t=0 with dt = -1/k.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .gemma import GemmaStack
from .layers import grouped_attention, prefix_lm_mask, rope_cos_sin
from .siglip import SiglipVisionTower

MAX_DENOISING_STEPS = 10


def time_schedule(steps: int) -> tuple[np.ndarray, float]:
    """The Euler sampler's times, accumulated in float32 exactly as openpi's `time += dt` loop does."""
    if not 1 <= steps <= MAX_DENOISING_STEPS:
        raise ValueError(f"steps: must be in 1..{MAX_DENOISING_STEPS}, got {steps}")
    dt = np.float32(-1.0 / steps)
    times, t = [], np.float32(1.0)
    while t >= -dt / 2:
        times.append(t)
        t = np.float32(t + dt)
    assert len(times) == steps, (steps, times)
    return np.asarray(times, dtype=np.float32), float(dt)


def sinusoidal_time_embedding(time: torch.Tensor, dim: int, min_period=4e-3, max_period=4.0) -> torch.Tensor:
    """time [B] -> [B, dim] sine-cosine embedding, computed in float64 as openpi does, returned in float32."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = (2 * math.pi / period)[None, :] * time[:, None].double()
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(time.dtype)


class PI0Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ew = cfg.expert.width
        self.vision = SiglipVisionTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.prefix_lm.width)
        self.prefix_lm = GemmaStack(cfg.prefix_lm)
        self.expert = GemmaStack(cfg.expert, adaptive=cfg.pi05)
        self.action_in_proj = nn.Linear(cfg.action_dim, ew)
        self.action_out_proj = nn.Linear(ew, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(ew, ew)
            self.time_mlp_out = nn.Linear(ew, ew)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, ew)
            self.action_time_mlp_in = nn.Linear(2 * ew, ew)
            self.action_time_mlp_out = nn.Linear(ew, ew)
        self.vision_dtype = torch.float32
        self.compute_dtype = torch.float32

    # ---------------------------------------------------------------- precision
    def set_precision(self, compute_dtype: torch.dtype, vision_dtype: torch.dtype | None = None) -> PI0Model:
        """Vision (and projector) in `vision_dtype`, both Gemma stacks in `compute_dtype`. The small action
        and time projections stay float32, and norms compute in float32 whatever their storage."""
        vision_dtype = vision_dtype or compute_dtype
        self.vision.to(vision_dtype)
        self.projector.to(vision_dtype)
        self.prefix_lm.to(compute_dtype)
        self.expert.to(compute_dtype)
        self.vision_dtype, self.compute_dtype = vision_dtype, compute_dtype
        return self

    # ---------------------------------------------------------------- stage 1: vision
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, V, 3, H, W] float in [-1, 1] -> image tokens [B, V*T, D_lm] in compute dtype."""
        b, v = pixels.shape[:2]
        features = self.vision(pixels.flatten(0, 1), self.vision_dtype)  # [B*V, T, Dv]
        # The explicit cast is the boundary between the vision precision and the prefix precision.
        tokens = self.projector(features).to(self.compute_dtype)
        return tokens.view(b, v * tokens.shape[1], tokens.shape[2])

    # ---------------------------------------------------------------- stage 2: prefix
    def prefix_inputs(self, image_tokens, image_masks, tokens, token_masks):
        """Prefix embeddings [B, P, D] and validity mask [B, P]."""
        per_view = self.cfg.vision.tokens_per_image
        lang = self.prefix_lm.embed(tokens).to(self.compute_dtype)
        embs = torch.cat([image_tokens, lang], dim=1)
        pad = torch.cat([image_masks.repeat_interleave(per_view, dim=1), token_masks], dim=1)
        return embs, pad

    def fill_prefix(self, image_tokens, image_masks, tokens, token_masks, kv_cache: torch.Tensor | None = None):
        """Run the prefix LM over image and prompt tokens and write every layer's keys and values.

        image_tokens [B, V*T, D], image_masks bool [B, V], tokens long [B, L], token_masks bool [B, L]
        -> kv_cache [depth, 2, B, Hkv, P, Dh] (written in place when given), prefix_mask bool [B, P].
        """
        hidden, pad = self.prefix_inputs(image_tokens, image_masks, tokens, token_masks)
        allowed = prefix_lm_mask(pad, torch.zeros(pad.shape[1], dtype=torch.int32, device=pad.device))
        cos, sin = rope_cos_sin(torch.cumsum(pad, 1) - 1, self.cfg.prefix_lm.head_dim,
                                self.cfg.prefix_lm.rope_theta, hidden.dtype)
        layers = self.prefix_lm.layers
        keys_values = []
        for i, layer in enumerate(layers):
            q, k, v, gate = layer.qkv(hidden, cos, sin, None)
            if kv_cache is not None:
                kv_cache[i, 0].copy_(k)
                kv_cache[i, 1].copy_(v)
            else:
                keys_values.append(torch.stack([k, v]))
            if i == len(layers) - 1:
                break  # the last layer's output is never read: only its keys and values are
            hidden = layer.finish(hidden, grouped_attention(q, k, v, allowed), gate, None)
        if kv_cache is None:
            kv_cache = torch.stack(keys_values)
        return kv_cache, pad

    # ---------------------------------------------------------------- stage 3: denoise
    def suffix_inputs(self, state, x_t, time):
        """Suffix embeddings [B, S, D_e], its autoregressive mask [S], and the adaRMS condition (pi0.5)."""
        ew = self.cfg.expert.width
        time_emb = sinusoidal_time_embedding(time, ew)  # [B, D_e] float32
        action_emb = self.action_in_proj(x_t)  # [B, H, D_e]
        if self.cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            embs = action_emb
        else:
            cond = None
            time_emb = time_emb[:, None, :].expand_as(action_emb)
            action_time = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([action_emb, time_emb], 2))))
            embs = torch.cat([self.state_proj(state)[:, None, :], action_time], dim=1)
        # Autoregressive mask: the suffix starts a new block (1), and for pi0 the state token is a block of
        # its own before the actions (1, 1, 0, ...). Built with device ops so CUDA-graph capture copies nothing.
        positions = torch.arange(embs.shape[1], device=x_t.device)
        ar_mask = (positions <= (0 if self.cfg.pi05 else 1)).to(torch.int32)
        cond = None if cond is None else cond.to(self.compute_dtype)
        return embs.to(self.compute_dtype), ar_mask, cond

    def velocity(self, kv_cache, prefix_mask, state, x_t, time) -> torch.Tensor:
        """One flow-matching velocity v(x_t, t) attending to the cached prefix. x_t [B, H, A] -> [B, H, A] f32."""
        hidden, ar, cond = self.suffix_inputs(state, x_t, time)
        b, s = hidden.shape[:2]
        suffix_pad = torch.ones(b, s, dtype=torch.bool, device=hidden.device)
        allowed = torch.cat([prefix_mask[:, None, :].expand(b, s, prefix_mask.shape[1]),
                             prefix_lm_mask(suffix_pad, ar)], dim=2)  # [B, S, P + S]
        positions = prefix_mask.sum(1, keepdim=True) + torch.arange(s, device=hidden.device)[None]
        cos, sin = rope_cos_sin(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_theta, hidden.dtype)
        for i, layer in enumerate(self.expert.layers):
            q, k, v, gate = layer.qkv(hidden, cos, sin, cond)
            k = torch.cat([kv_cache[i, 0], k], dim=2)
            v = torch.cat([kv_cache[i, 1], v], dim=2)
            hidden = layer.finish(hidden, grouped_attention(q, k, v, allowed), gate, cond)
        return self._velocity_head(hidden, cond, x_t.shape[1])

    def _velocity_head(self, suffix_hidden, cond, horizon):
        out, _ = self.expert.norm(suffix_hidden, cond)
        return self.action_out_proj(out[:, -horizon:].float())

    def denoise(self, kv_cache, prefix_mask, state, noise, times: torch.Tensor, dt: float) -> torch.Tensor:
        """k Euler steps from x_1 = noise to x_0 over the precomputed `times` [k] (on the device)."""
        x_t = noise
        b = noise.shape[0]
        for step in range(times.shape[0]):
            v_t = self.velocity(kv_cache, prefix_mask, state, x_t, times[step].expand(b))
            x_t = x_t + dt * v_t
        return x_t

    # ---------------------------------------------------------------- the uncached reference
    def velocity_uncached(self, image_tokens, image_masks, tokens, token_masks, state, x_t, time):
        """v(x_t, t) with prefix and suffix in one attention pass (joint mask), no KV cache."""
        prefix, prefix_pad = self.prefix_inputs(image_tokens, image_masks, tokens, token_masks)
        suffix, suffix_ar, cond = self.suffix_inputs(state, x_t, time)
        b, p, s = prefix.shape[0], prefix.shape[1], suffix.shape[1]
        pad = torch.cat([prefix_pad, torch.ones(b, s, dtype=torch.bool, device=prefix.device)], dim=1)
        ar = torch.cat([torch.zeros(p, dtype=torch.int32, device=prefix.device), suffix_ar])
        allowed = prefix_lm_mask(pad, ar)
        cos, sin = rope_cos_sin(torch.cumsum(pad, 1) - 1, self.cfg.prefix_lm.head_dim,
                                self.cfg.prefix_lm.rope_theta, prefix.dtype)
        for prefix_layer, expert_layer in zip(self.prefix_lm.layers, self.expert.layers, strict=True):
            qp, kp, vp, gp = prefix_layer.qkv(prefix, cos[:, :p], sin[:, :p], None)
            qs, ks, vs, gs = expert_layer.qkv(suffix, cos[:, p:], sin[:, p:], cond)
            out = grouped_attention(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), allowed)
            prefix = prefix_layer.finish(prefix, out[:, :p], gp, None)
            suffix = expert_layer.finish(suffix, out[:, p:], gs, cond)
        return self._velocity_head(suffix, cond, x_t.shape[1])

    def sample_actions_uncached(self, pixels, image_masks, tokens, token_masks, state, noise, steps: int):
        times, dt = time_schedule(steps)
        image_tokens = self.encode_images(pixels)
        x_t = noise
        for t in times:
            time = torch.full((noise.shape[0],), float(t), dtype=torch.float32, device=noise.device)
            x_t = x_t + dt * self.velocity_uncached(image_tokens, image_masks, tokens, token_masks, state, x_t, time)
        return x_t

    def sample_actions(self, pixels, image_masks, tokens, token_masks, state, noise, steps: int):
        """The split path end to end: vision -> prefix (KV cache) -> k denoise steps."""
        times, dt = time_schedule(steps)
        kv, prefix_mask = self.fill_prefix(self.encode_images(pixels), image_masks, tokens, token_masks)
        return self.denoise(kv, prefix_mask, state, noise, torch.from_numpy(times).to(noise.device), dt)
