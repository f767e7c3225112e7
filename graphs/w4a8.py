"""W4A8 GEMMs: 4-bit weights (two per byte), 8-bit activations, DuQuant smoothing (graphs/duquant.py).

At load, each weight is transformed by its GEMM's smoothing (W T), quantised symmetrically to [-7, 7]
per output channel and per group of `group` input channels (a scale each), and packed two values per
byte; the transform's scale, reflections and permutation are kept as buffers (float32: they are small).
Per call: the input is smoothed (x T), quantised per token to int8, multiplied and rescaled.

The product here is a reference, not the kernel: on every call it unpacks the 4-bit weights and applies
their group scales (a dequantised copy, in the input's dtype) and runs one GEMM with the dequantised
activations. It computes what the integer kernel would (up to float rounding) and is what the accuracy
tests check; it reads more bytes than bf16 does. A GPU kernel that unpacks inside the GEMM (no unpacked
copy in memory) is the next step and is not written yet.
"""

from __future__ import annotations

import torch
from torch import nn

from .duquant import Smoothing
from .int8 import quantize_per_row

INT4_MAX = 7
DEFAULT_GROUP = 128


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7], K even -> uint8 [N, K / 2]: column 2j in the low nibble,
    column 2j + 1 in the high one (two's complement)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4: an even number of columns is needed, got {q.shape[-1]}")
    if q.min() < -8 or q.max() > 7:
        raise ValueError("int4: values must lie in [-8, 7]")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [N, K / 2] -> int8 [N, K]."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    values = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(values >= 8, values - 16, values).to(torch.int8)


def quantize_int4_grouped(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 values in [-7, 7] [N, K], scales [N, K / group] float32)."""
    n, k = w.shape
    grouped = w.float().reshape(n, k // group, group)
    scale = (grouped.abs().amax(dim=-1, keepdim=True) / INT4_MAX).clamp(min=1e-12)
    q = torch.round(grouped / scale).clamp(-INT4_MAX, INT4_MAX).to(torch.int8)
    return q.reshape(n, k), scale.squeeze(-1)


class W4A8Linear(nn.Module):
    """y = x W^T with W in 4 bits per group of input channels and x in 8 bits per token, both smoothed."""

    observing = False  # the FP8 path's calibration flag: the smoothing is fitted before this is made

    def __init__(self, weight: torch.Tensor, smoothing: Smoothing | None = None, group: int = DEFAULT_GROUP):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = min(group, self.in_features)
        if self.in_features % self.group:
            raise ValueError(f"w4a8: {self.in_features} input channels are not a multiple of {self.group}")
        self.smoothed = smoothing is not None
        w = weight.detach().float()
        if smoothing is not None:
            # float32 on both sides (the vectors are small): x W^T = apply(x) fold(W)^T holds to float32
            smoothing = smoothing.to(weight.device)
            w = smoothing.fold(w)
            for name in ("scale", "rotate1", "perm", "rotate2"):  # cached as buffers (move with the module)
                self.register_buffer(name, getattr(smoothing, name), persistent=False)
        q, scales = quantize_int4_grouped(w, self.group)
        self.register_buffer("weight_packed", pack_int4(q), persistent=False)  # [N, K / 2] uint8
        self.register_buffer("weight_scales", scales, persistent=False)  # [N, K / group] float32

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        if not self.smoothed:
            return x
        return Smoothing(self.scale, self.rotate1, self.perm, self.rotate2).apply(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._smooth(x.reshape(-1, self.in_features).float())
        q, x_scale = quantize_per_row(flat)
        w = unpack_int4(self.weight_packed).reshape(self.out_features, -1, self.group).to(x.dtype)
        w = (w * self.weight_scales.to(x.dtype)[..., None]).reshape(self.out_features, self.in_features)
        y = (q.to(x.dtype) * x_scale.to(x.dtype)) @ w.t()
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes of weights one application reads: the packed values, their scales and the smoothing."""
        rotations = ("scale", "rotate1", "rotate2") if self.smoothed else ()
        extra = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in rotations)
        return (
            self.weight_packed.numel()
            + self.weight_scales.numel() * self.weight_scales.element_size()
            + extra
        )
