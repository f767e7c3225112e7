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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .gemma import GemmaStack
from .layers import attention_bias, grouped_attention, prefix_lm_mask, rope_cos_sin
from .siglip import SiglipVisionTower

MAX_DENOISING_STEPS = 10


# The per-layer bodies the stages loop over. A runtime may hand the stages compiled versions of them
# (regional compilation: one compile serves every layer of a stack, so start-up traces a layer, not a
# stack); the model's own calls use these.
def call_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A vision encoder layer."""
    return layer(x)


def prefix_layer(layer, hidden, cos, sin, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefix layer: its keys and values [2, B, Hkv, P, Dh] and its output [B, P, D]."""
    q, k, v, gate = layer.qkv(hidden, cos, sin, None)
    return torch.stack([k, v]), layer.finish(hidden, grouped_attention(q, k, v, bias), gate, None)


def prefix_layer_kv(layer, hidden, cos, sin) -> torch.Tensor:
    """The last prefix layer: its keys and values only (its output is never read)."""
    _, k, v, _ = layer.qkv(hidden, cos, sin, None)
    return torch.stack([k, v])


def expert_layer(layer, hidden, cos, sin, mod_in, mod_post, layer_kv, prefix_len: int, bias) -> torch.Tensor:
    """An action-expert layer over the cached prefix: writes this step's suffix keys and values into
    `layer_kv` [2, B, Hkv, P + S + pad, Dh] after the `prefix_len` cached ones, returns its output."""
    q, k, v, gate = layer.qkv(hidden, cos, sin, mod_in)
    layer_kv[:, :, :, prefix_len : prefix_len + k.shape[2]] = torch.stack([k, v])
    return layer.finish(hidden, grouped_attention(q, layer_kv[0], layer_kv[1], bias), gate, mod_post)


def velocity_head(norm, out_proj, suffix_hidden, mod, horizon: int) -> torch.Tensor:
    """The expert's final norm and the action projection: [B, S, D_e] -> velocity [B, H, A] float32."""
    out, _ = norm(suffix_hidden, mod)
    out = out[:, -horizon:].float()
    # float32 [H x D_e] @ [D_e x A]: cuBLAS picks a split-K SGEMM for this shape (about 20 us per step on
    # an H100); as a multiply-and-sum, Inductor makes it one small reduction kernel.
    return (out[..., None, :] * out_proj.weight).sum(-1) + out_proj.bias


@dataclass(frozen=True)
class LayerFns:
    vision: Callable = call_layer
    prefix: Callable = prefix_layer
    prefix_kv: Callable = prefix_layer_kv
    expert: Callable = expert_layer
    head: Callable = velocity_head


EAGER_LAYERS = LayerFns()


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
        """The SigLIP tower in `vision_dtype` (fp16 suits it on GPUs), the projector and both Gemma stacks in
        `compute_dtype`. The small action and time projections stay float32, and norms compute in float32
        whatever their storage."""
        vision_dtype = vision_dtype or compute_dtype
        self.vision.to(vision_dtype)
        self.projector.to(compute_dtype)
        self.prefix_lm.to(compute_dtype)
        self.expert.to(compute_dtype)
        self.vision_dtype, self.compute_dtype = vision_dtype, compute_dtype
        # Projections that read the same input become one GEMM (parameters become views of it).
        self.vision.fuse()
        self.prefix_lm.fuse()
        self.expert.fuse()
        return self

    # ---------------------------------------------------------------- stage 1: vision
    def encode_images(self, pixels: torch.Tensor, layers: LayerFns = EAGER_LAYERS) -> torch.Tensor:
        """pixels [B, V, 3, H, W] float in [-1, 1] -> image tokens [B, V*T, D_lm] in compute dtype."""
        b, v = pixels.shape[:2]
        features = self.vision(pixels.flatten(0, 1), self.vision_dtype, layers.vision)  # [B*V, T, Dv]
        # The explicit cast is the boundary between the vision precision and the projector's and prefix's:
        # with it an fp16 tower can never meet a bf16 GEMM ("mat1 and mat2 must have the same dtype").
        tokens = self.projector(features.to(self.compute_dtype))
        return tokens.view(b, v * tokens.shape[1], tokens.shape[2])

    # ---------------------------------------------------------------- stage 2: prefix
    def prefix_inputs(self, image_tokens, image_masks, tokens, token_masks):
        """Prefix embeddings [B, P, D] and validity mask [B, P]."""
        lang = self.prefix_lm.embed(tokens).to(self.compute_dtype)
        embs = torch.cat([image_tokens, lang], dim=1)
        return embs, self.prefix_validity(image_masks, token_masks)

    def prefix_validity(self, image_masks, token_masks) -> torch.Tensor:
        """Validity of every prefix token [B, P]: each view's tokens follow its image mask."""
        per_view = self.cfg.vision.tokens_per_image
        return torch.cat([image_masks.repeat_interleave(per_view, dim=1), token_masks], dim=1)

    def prefix_rope(self, validity) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the prefix tokens (positions count valid tokens only), cos/sin [B, P, Dh]."""
        lm = self.cfg.prefix_lm
        return rope_cos_sin(torch.cumsum(validity, 1) - 1, lm.head_dim, lm.rope_theta, self.compute_dtype)

    def fill_prefix(
        self,
        image_tokens,
        image_masks,
        tokens,
        token_masks,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        layers: LayerFns = EAGER_LAYERS,
    ):
        """Run the prefix LM over image and prompt tokens and write every layer's keys and values.

        image_tokens [B, V*T, D], image_masks bool [B, V], tokens long [B, L], token_masks bool [B, L]
        -> kv_cache [depth, 2, B, Hkv, P, Dh], prefix_mask bool [B, P].
        `rope`: the tables from `prefix_rope`, when the caller computed them (see StageRunner).
        """
        hidden, pad = self.prefix_inputs(image_tokens, image_masks, tokens, token_masks)
        allowed = prefix_lm_mask(pad, torch.zeros(pad.shape[1], dtype=torch.int32, device=pad.device))
        bias = attention_bias(allowed, hidden.dtype)
        cos, sin = rope if rope is not None else self.prefix_rope(pad)
        *body, last = self.prefix_lm.layers
        keys_values = []
        for layer in body:
            kv, hidden = layers.prefix(layer, hidden, cos, sin, bias)
            keys_values.append(kv)
        keys_values.append(layers.prefix_kv(last, hidden, cos, sin))  # its output is never read
        return torch.stack(keys_values), pad

    # ---------------------------------------------------------------- stage 3: denoise
    def time_conditioning(self, time: torch.Tensor) -> torch.Tensor:
        """Everything a denoising step needs from its time alone, time [B] ->
        pi0.5: the adaptive norms' modulations [2*depth + 1, B, 3*D_e] (compute dtype);
        pi0:   the sine-cosine time embedding [1, B, D_e] (float32), fused with the actions per step."""
        time_emb = sinusoidal_time_embedding(time, self.cfg.expert.width)  # [B, D_e] float32
        if not self.cfg.pi05:
            return time_emb[None]
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
        return self.expert.modulations(cond.to(self.compute_dtype))

    def suffix_embeddings(self, state, x_t, time_cond):
        """Suffix tokens [B, S, D_e]: pi0.5 the projected noisy actions; pi0 a state token followed by the
        action-time MLP of (actions, time embedding)."""
        action_emb = self.action_in_proj(x_t)  # [B, H, D_e]
        if self.cfg.pi05:
            return action_emb.to(self.compute_dtype)
        time_emb = time_cond[0][:, None, :].expand_as(action_emb)
        action_time = self.action_time_mlp_out(
            F.silu(self.action_time_mlp_in(torch.cat([action_emb, time_emb], 2)))
        )
        return torch.cat([self.state_proj(state)[:, None, :], action_time], dim=1).to(self.compute_dtype)

    def suffix_ar_mask(self, device) -> torch.Tensor:
        """The suffix starts a new attention block (1); pi0's state token is a block of its own before the
        actions (1, 1, 0, ...). Built with device ops so CUDA-graph capture copies nothing from the host."""
        positions = torch.arange(self.cfg.suffix_len, device=device)
        return (positions <= (0 if self.cfg.pi05 else 1)).to(torch.int32)

    def suffix_attention(self, prefix_mask):
        """Per-frame constants of the denoising loop: attention bias over [prefix | suffix], RoPE tables."""
        b, s, e = prefix_mask.shape[0], self.cfg.suffix_len, self.cfg.expert
        suffix_pad = torch.ones(b, s, dtype=torch.bool, device=prefix_mask.device)
        allowed = torch.cat(
            [
                prefix_mask[:, None, :].expand(b, s, prefix_mask.shape[1]),
                prefix_lm_mask(suffix_pad, self.suffix_ar_mask(prefix_mask.device)),
            ],
            dim=2,
        )
        # Key padding: the denoise attention's GEMMs run on P + S keys; a count that is not a multiple of 8
        # (pi05: 968 + 50) sends cuBLAS to 2-element-aligned kernels about twice as slow. Pad keys are
        # zeros that no query may attend to.
        pad = self.key_padding(prefix_mask.shape[1])
        allowed = torch.cat([allowed, allowed.new_zeros(b, s, pad)], dim=2)
        bias = attention_bias(allowed, self.compute_dtype)  # [B, 1, S, P + S + pad]
        positions = prefix_mask.sum(1, keepdim=True) + torch.arange(s, device=prefix_mask.device)[None]
        cos, sin = rope_cos_sin(positions, e.head_dim, e.rope_theta, self.compute_dtype)
        return bias, cos, sin

    def key_padding(self, prefix_len: int) -> int:
        return -(prefix_len + self.cfg.suffix_len) % 8

    def attention_workspace(self, kv_cache: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the prefix cache followed by room for the suffix's keys and values and the key
        padding: `depth` tensors [2, B, Hkv, P + S + pad, Dh], built once per frame. Each denoising step
        writes its suffix keys and values into the room in place, so attention reads one contiguous key
        range instead of a concatenation made per layer and step. The padding stays zero and is masked.

        Separate tensors, not views of one: Inductor writes a slice assignment into a compiled function's
        input in place, fused into the kernel that computes the values, only when no other view of the
        same storage is written; with one shared tensor it clones the whole workspace on every call."""
        room = self.cfg.suffix_len + self.key_padding(kv_cache.shape[-2])
        return [F.pad(layer_cache, (0, 0, 0, room)) for layer_cache in kv_cache]

    def velocity(
        self,
        workspace,
        prefix_len: int,
        bias,
        cos,
        sin,
        state,
        x_t,
        time_cond,
        layers: LayerFns = EAGER_LAYERS,
    ) -> torch.Tensor:
        """One flow-matching velocity v(x_t, t) over the cached prefix. x_t [B, H, A] -> [B, H, A] f32.
        `workspace` comes from `attention_workspace`; this step's suffix keys and values are written into
        it after the `prefix_len` cached ones."""
        hidden = self.suffix_embeddings(state, x_t, time_cond)
        mods = time_cond if self.cfg.pi05 else None
        for i, layer in enumerate(self.expert.layers):
            mod_in, mod_post = (mods[2 * i], mods[2 * i + 1]) if mods is not None else (None, None)
            hidden = layers.expert(layer, hidden, cos, sin, mod_in, mod_post, workspace[i], prefix_len, bias)
        return self._velocity_head(hidden, mods, x_t.shape[1], layers)

    def _velocity_head(self, suffix_hidden, mods, horizon, layers: LayerFns = EAGER_LAYERS):
        mod = mods[-1] if mods is not None else None
        return layers.head(self.expert.norm, self.action_out_proj, suffix_hidden, mod, horizon)

    def step_conditioning(self, times: torch.Tensor, batch: int) -> list[torch.Tensor]:
        """time_conditioning for every step of a schedule; depends on weights and times only."""
        return [self.time_conditioning(times[i].expand(batch)) for i in range(times.shape[0])]

    def denoise(
        self,
        kv_cache,
        prefix_mask,
        state,
        noise,
        times: torch.Tensor,
        dt: float,
        step_conds: list[torch.Tensor] | None = None,
        velocity_fn=None,
    ) -> torch.Tensor:
        """k Euler steps from x_1 = noise to x_0 over the precomputed `times` [k] (on the device).
        `step_conds` (from `step_conditioning`) may be computed once per schedule and reused."""
        velocity_fn = velocity_fn or self.velocity
        step_conds = step_conds if step_conds is not None else self.step_conditioning(times, noise.shape[0])
        bias, cos, sin = self.suffix_attention(prefix_mask)
        workspace, prefix_len = self.attention_workspace(kv_cache), kv_cache.shape[-2]
        # A copy, so every step's x_t is the same kind of tensor (an inference tensor under inference mode,
        # where the noise buffer, allocated outside it, is not): a compiled velocity_fn guards on that
        # kind and would otherwise be traced twice per shape, at every start.
        x_t = noise.clone()
        for cond in step_conds:
            x_t = x_t + dt * velocity_fn(workspace, prefix_len, bias, cos, sin, state, x_t, cond)
        return x_t

    def denoise_guided(
        self,
        kv_cache,
        prefix_mask,
        state,
        noise,
        times: list[float],
        dt: float,
        step_conds: list[torch.Tensor],
        handover: torch.Tensor,
        guidance=None,
        velocity_fn=None,
    ) -> torch.Tensor:
        """`denoise` toward a previous chunk (runtime/handover.py). handover [B, 3, H, A] float32: the
        previous actions, the soft mask's weights, the frozen entries (1.0); all in model space.

        After every step the frozen entries are put on the straight path from their noise to the
        previous actions (x_t = t * noise + (1 - t) * previous, exactly `previous` after the last step):
        inpainting. With `guidance` (rtc, runtime.handover.RtcGuidance: per step a clipped weight and
        whether the product is exact) each velocity is also corrected toward the previous chunk: with
        x0_hat = x_t - t * v(x_t) the model's guess of the clean actions, v -= weight * J^T (W * (previous
        - x0_hat)), J = d x0_hat / d x_t, a vector-Jacobian product through the expert on the exact
        steps, J = I on the others. Euler steps go from t = 1 toward 0 (dt < 0), so subtracting from v
        moves x_t toward the previous actions.

        `times` are host floats (the schedule is fixed per captured graph). Autograd needs tensors made
        outside inference mode: the caller's step_conds must be (StageRunner makes them under no_grad);
        the workspace and the differentiated copy of x_t are made here."""
        velocity_fn = velocity_fn or self.velocity
        previous, weights, frozen = handover.unbind(1)  # each [B, H, A]
        frozen = frozen > 0.5
        with torch.inference_mode(False):
            bias, cos, sin = self.suffix_attention(prefix_mask)
            workspace, prefix_len = self.attention_workspace(kv_cache), kv_cache.shape[-2]
            x_t = noise
            last = len(step_conds) - 1
            for i, cond in enumerate(step_conds):
                t = times[i]
                if guidance is None or not guidance.exact[i]:
                    with torch.no_grad():
                        velocity = velocity_fn(workspace, prefix_len, bias, cos, sin, state, x_t, cond)
                        if guidance is not None:  # J = I: the correction is the weighted error itself
                            velocity = velocity - guidance.weights[i] * weights * (
                                previous - (x_t - t * velocity)
                            )
                else:
                    with torch.enable_grad():
                        x_in = x_t.detach().clone().requires_grad_(True)
                        # A fresh view of the workspace per step: this step's suffix keys and values are
                        # written into it with their autograd history, which must not reach back into the
                        # previous step's (already used) graph.
                        step_ws = [layer.detach() for layer in workspace]
                        v = velocity_fn(step_ws, prefix_len, bias, cos, sin, state, x_in, cond)
                        x0_hat = x_in - t * v
                        error = weights * (previous - x0_hat.detach())
                        (correction,) = torch.autograd.grad(x0_hat, x_in, error)
                    velocity = v.detach() - guidance.weights[i] * correction
                with torch.no_grad():
                    x_t = x_t + dt * velocity
                    target = previous if i == last else (t + dt) * noise + (1.0 - (t + dt)) * previous
                    x_t = torch.where(frozen, target, x_t)
        return x_t

    # ---------------------------------------------------------------- the uncached reference
    def velocity_uncached(self, image_tokens, image_masks, tokens, token_masks, state, x_t, time):
        """v(x_t, t) with prefix and suffix in one attention pass (joint mask), no KV cache."""
        prefix, prefix_pad = self.prefix_inputs(image_tokens, image_masks, tokens, token_masks)
        time_cond = self.time_conditioning(time)
        suffix = self.suffix_embeddings(state, x_t, time_cond)
        mods = time_cond if self.cfg.pi05 else None
        b, p, s = prefix.shape[0], prefix.shape[1], suffix.shape[1]
        pad = torch.cat([prefix_pad, torch.ones(b, s, dtype=torch.bool, device=prefix.device)], dim=1)
        ar = torch.cat(
            [torch.zeros(p, dtype=torch.int32, device=prefix.device), self.suffix_ar_mask(prefix.device)]
        )
        lm = self.cfg.prefix_lm
        bias = attention_bias(prefix_lm_mask(pad, ar), prefix.dtype)
        cos, sin = rope_cos_sin(torch.cumsum(pad, 1) - 1, lm.head_dim, lm.rope_theta, prefix.dtype)
        for i, (prefix_block, expert_block) in enumerate(
            zip(self.prefix_lm.layers, self.expert.layers, strict=True)
        ):
            mod_in, mod_post = (mods[2 * i], mods[2 * i + 1]) if mods is not None else (None, None)
            qp, kp, vp, gp = prefix_block.qkv(prefix, cos[:, :p], sin[:, :p], None)
            qs, ks, vs, gs = expert_block.qkv(suffix, cos[:, p:], sin[:, p:], mod_in)
            # Queries of both stacks in one softmax: fold each stack's head groups the same way.
            q = torch.cat([qp, qs], 1)
            out = grouped_attention(q, torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), bias)
            prefix = prefix_block.finish(prefix, out[:, :p], gp, None)
            suffix = expert_block.finish(suffix, out[:, p:], gs, mod_post)
        return self._velocity_head(suffix, mods, x_t.shape[1])

    def sample_actions_uncached(self, pixels, image_masks, tokens, token_masks, state, noise, steps: int):
        times, dt = time_schedule(steps)
        image_tokens = self.encode_images(pixels)
        x_t = noise
        for t in times:
            time = torch.full((noise.shape[0],), float(t), dtype=torch.float32, device=noise.device)
            x_t = x_t + dt * self.velocity_uncached(
                image_tokens, image_masks, tokens, token_masks, state, x_t, time
            )
        return x_t

    def sample_actions(self, pixels, image_masks, tokens, token_masks, state, noise, steps: int):
        """The split path end to end: vision -> prefix (KV cache) -> k denoise steps."""
        times, dt = time_schedule(steps)
        kv, prefix_mask = self.fill_prefix(self.encode_images(pixels), image_masks, tokens, token_masks)
        return self.denoise(kv, prefix_mask, state, noise, torch.from_numpy(times).to(noise.device), dt)
