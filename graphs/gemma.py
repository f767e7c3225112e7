"""Gemma decoder stacks: the prefix language model (Gemma 2B) and the action expert (Gemma 300M).

Layers are kept as plain parameter holders with small helpers (`qkv`, `finish`) because the pi0 family
runs two stacks *jointly*: at every depth the prefix tokens go through the prefix layer, the action
tokens through the expert layer, and both attend in one softmax. Submodule names match the checkpoint
keys under `...language_model.` and `...gemma_expert.model.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig
from .layers import GemmaMLP, GemmaRMSNorm, apply_rope, fuse_linears, gated_residual


class GemmaAttentionProjections(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse()
        self.qkv_quant = self.o_quant = None  # quantised GEMMs (graphs/fp8.py, int8.py, w4a8.py)
        self.quant_enabled = False

    def fuse(self) -> None:
        self.qkv_weight, _ = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: torch.Tensor):
        kv = self.num_kv_heads * self.head_dim
        if self.quant_enabled:
            return self.qkv_quant(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        if self.qkv_weight is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return F.linear(x, self.qkv_weight).split([self.num_heads * self.head_dim, kv, kv], dim=-1)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_quant(x) if self.quant_enabled else self.o_proj(x)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, adaptive: bool):
        super().__init__()
        cond_dim = cfg.width if adaptive else None
        self.input_layernorm = GemmaRMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.self_attn = GemmaAttentionProjections(cfg)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.mlp = GemmaMLP(cfg.width, cfg.mlp_dim)

    def qkv(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, modulation: torch.Tensor | None
    ):
        """hidden [B, T, D] -> q [B, T, H, Dh] (token-major, see `grouped_attention`), k/v [B, Hkv, T, Dh]
        (the cache's layout), RoPE applied to q and k; and the residual gate."""
        normed, gate = self.input_layernorm(hidden, modulation)
        attn = self.self_attn
        b, t, _ = hidden.shape
        q, k, v = attn.project(normed)
        q = q.reshape(b, t, attn.num_heads, attn.head_dim)
        k = k.reshape(b, t, attn.num_kv_heads, attn.head_dim)
        v = v.reshape(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin).transpose(1, 2), v, gate

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor, gate, modulation: torch.Tensor | None):
        """Output projection, (gated) residual, MLP and its (gated) residual."""
        hidden = gated_residual(hidden, self.self_attn.output(attn_out.to(hidden.dtype)), gate)
        normed, gate = self.post_attention_layernorm(hidden, modulation)
        return gated_residual(hidden, self.mlp(normed), gate)


class GemmaStack(nn.Module):
    def __init__(self, cfg: GemmaConfig, adaptive: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width) if cfg.vocab_size else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, adaptive) for _ in range(cfg.depth))
        self.norm = GemmaRMSNorm(cfg.width, cfg.rms_norm_eps, cfg.width if adaptive else None)
        self.float_weights_released = False  # see release_float_weights

    def modulations(self, cond: torch.Tensor) -> torch.Tensor:
        """pi0.5: every adaptive norm's modulation for one time condition [B, C] -> [2*depth + 1, B, 3D]
        (per layer: input norm, post-attention norm; last: the final norm)."""
        mods = [
            m
            for layer in self.layers
            for m in (layer.input_layernorm.modulation(cond), layer.post_attention_layernorm.modulation(cond))
        ]
        return torch.stack(mods + [self.norm.modulation(cond)])

    def fuse(self) -> None:
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def quantize(self, make, last_layer_kv_only: bool = False) -> int:
        """Attach a quantised copy, `make(weight [N, K])`, of every GEMM weight (the q/k/v, output, gate/up
        and down projections; the float weights stay, for the reference path). The prefix LM's last layer
        computes only its keys and values (PI0Model.fill_prefix): `last_layer_kv_only`. Returns the number
        of quantised GEMMs."""
        count = 0
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_weight is None or mlp.gate_up_weight is None:
                raise ValueError("quantize: fuse the projections first (PI0Model.set_precision)")
            attn.qkv_quant = make(attn.qkv_weight)
            count += 1
            if last_layer_kv_only and i == len(self.layers) - 1:
                break
            attn.o_quant = make(attn.o_proj.weight)
            mlp.gate_up_quant = make(mlp.gate_up_weight)
            mlp.down_quant = make(mlp.down_proj.weight)
            count += 3
        return count

    def set_quantized(self, enabled: bool) -> None:
        """Route the layers' GEMMs through their quantised copies (attached by `quantize`)."""
        if not enabled and self.float_weights_released:
            raise ValueError("the float weights of this stack were released; only its quantised GEMMs remain")
        for layer in self.layers:
            if enabled and layer.self_attn.qkv_quant is None:
                raise ValueError("quantize the stack first (GemmaStack.quantize)")
            layer.self_attn.quant_enabled = layer.mlp.quant_enabled = enabled

    def release_float_weights(self) -> int:
        """Drop the float weights of every quantised GEMM (the quantised copies serve; on an edge GPU the
        float ones would take more memory than they do). The float path is gone after this. Returns
        the bytes freed."""
        freed = 0
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for quantised, owner, fused, linears in (
                (attn.qkv_quant, attn, "qkv_weight", (attn.q_proj, attn.k_proj, attn.v_proj)),
                (attn.o_quant, None, None, (attn.o_proj,)),
                (mlp.gate_up_quant, mlp, "gate_up_weight", (mlp.gate_proj, mlp.up_proj)),
                (mlp.down_quant, None, None, (mlp.down_proj,)),
            ):
                if quantised is None:
                    continue
                freed += sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
                if fused is not None:
                    setattr(owner, fused, None)  # the fused matrix the linears' weights are views of
                for lin in linears:
                    lin.weight.data = lin.weight.data.new_empty(0)
        self.float_weights_released = True
        return freed

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding scaled by sqrt(width), as Gemma (and openpi's embed_prefix) does."""
        emb = self.embed_tokens(tokens)
        return emb * math.sqrt(emb.shape[-1])
