"""Building blocks shared by the stage graphs: Gemma RMSNorm (plain and adaptive), GeGLU MLP, RoPE,
grouped-query attention with a boolean mask, and the prefix-LM mask rule.

Numerics follow openpi's PyTorch pi0: norms compute in float32 and cast back; RoPE angles in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_geglu import fp8_geglu


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm, `x * rsqrt(mean(x^2) + eps) * (1 + weight)`.

    With `cond_dim` set it is pi0.5's adaptive RMSNorm: a dense layer maps the time condition to a
    modulation (scale, shift, gate); the output is `normed * (1 + scale) + shift` and the gate scales the
    residual. The modulation depends on the denoising time alone, so callers compute it once per step
    (`modulation(cond)`) and pass it in.
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, C] -> [B, 3D] (scale, shift, gate)."""
        return self.dense(cond)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor | None = None):
        dtype = x.dtype
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(dtype), None
        if modulation is None:
            raise ValueError("adaptive RMSNorm needs its modulation")
        if x.dim() == 3:
            modulation = modulation[:, None, :]
        scale, shift, gate = modulation.chunk(3, dim=-1)
        normed = normed * (1.0 + scale.float()) + shift.float()
        return normed.to(dtype), gate.to(dtype)


def gated_residual(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return residual + update if gate is None else residual + update * gate


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input into one matrix, and
    re-point each original parameter at its slice of it: one GEMM instead of several, no extra memory,
    and checkpoint names and `state_dict` unchanged."""
    weight = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]).contiguous() if has_bias else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if has_bias:
            lin.bias.data = bias[row : row + n]
        row += n
    return weight, bias


class GemmaMLP(nn.Module):
    """GeGLU feed-forward with the tanh approximation of gelu."""

    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()
        self.gate_up_quant = self.down_quant = None  # quantised GEMMs (graphs/fp8.py, int8.py, w4a8.py)
        self.quant_enabled = False
        self.fused_geglu = False  # with FP8: gate/up, GeGLU and the cast in one kernel (graphs/fp8_geglu.py)

    def fuse(self) -> None:
        self.gate_up_weight, _ = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_enabled:
            gate_up, down = self.gate_up_quant, self.down_quant
            if self.fused_geglu and not (gate_up.observing or down.observing):
                x_fp8 = gate_up.quantize(x)
                # the rows the down GEMM reads (its padding of the real rows), zero past the computed ones
                down_rows = max(x_fp8.shape[0], down.padded_rows(math.prod(x.shape[:-1])))
                hidden = fp8_geglu(
                    x_fp8,
                    gate_up.weight_fp8.t(),  # the quantised [2N, K] row-major weight
                    gate_up.input_scale,
                    gate_up.weight_scale,
                    down.input_scale,
                    down_rows,
                )
                return down.matmul(hidden, x.shape[:-1])
            gate, up = gate_up(x).chunk(2, dim=-1)
            return down(F.gelu(gate, approximate="tanh") * up)
        if self.gate_up_weight is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary embedding tables for integer positions [B, T] -> cos, sin [B, T, head_dim] in `dtype`."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Dh]; cos/sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, T, S] -> additive bias [B, 1, T, S] for `grouped_attention`; built once per frame."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return bias[:, None]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention with 1/sqrt(Dh) scaling, for grouped queries (Gemma: 8 query heads, 1 KV head).

    q [B, T, Hq, Dh], k/v [B, Hkv, S, Dh], bias [B, 1, T, S] -> [B, T, Hq * Dh].
    The G query heads that share a KV head are stacked along the query axis, token-major (row t*G + g),
    so keys and values are read as they are, never copied G times, and with one KV head the output
    comes out of its GEMM already as [T, Hq * Dh], the output projection's input, with no transpose. The
    bias is broadcast over the G heads (repeating it measured the same). Every bias row must allow at
    least one key (see `prefix_lm_mask`).

    Written as two GEMMs around a float32 softmax (openpi's eager attention), not a fused attention
    kernel: with one KV head and a 50-token suffix, a flash kernel gets a handful of thread blocks and
    ran at ~90 us per call on an H100, while these GEMMs fill the GPU and Inductor fuses bias + softmax.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    folded = q.reshape(b, t, hkv, groups, d).transpose(1, 2).reshape(b, hkv, t * groups, d)
    scores = torch.matmul(folded, k.transpose(-1, -2))  # [B, Hkv, T*G, S]
    scores = scores.view(b, hkv, t, groups, -1) * (d**-0.5) + bias[:, :, :, None]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(b, hkv, t * groups, -1)
    out = torch.matmul(probs, v)  # [B, Hkv, T*G, Dh]
    return out.view(b, hkv, t, groups * d).transpose(1, 2).reshape(b, t, hq * d)


def prefix_lm_mask(pad_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """big_vision / openpi rule: token i attends to valid token j when cumsum(ar)[j] <= cumsum(ar)[i].

    pad_mask bool [B, N], ar_mask int [N] or [B, N] -> allowed bool [B, N, N]. A padding token, which
    may attend to nothing, is let attend to itself so that no softmax row is empty; no valid token
    ever attends to it, so valid outputs are unchanged.
    """
    cumsum = torch.cumsum(ar_mask.expand_as(pad_mask).to(torch.int32), dim=1)
    allowed = cumsum[:, None, :] <= cumsum[:, :, None]
    allowed = allowed & pad_mask[:, None, :] & pad_mask[:, :, None]
    eye = torch.eye(pad_mask.shape[1], dtype=torch.bool, device=pad_mask.device)
    return allowed | (eye & ~pad_mask[:, :, None])
