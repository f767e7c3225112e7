"""W4A8 GEMMs: 4-bit weights (two per byte), 8-bit activations, DuQuant smoothing (graphs/duquant.py).

At load, each weight is transformed by its GEMM's smoothing (W T), quantised symmetrically to [-7, 7]
per output channel and per group of `group` input channels (a scale each), and packed two values per
byte; the transform's scale, reflections and permutation are kept as buffers (float32: they are small).
Per call: the input is smoothed (x T), quantised per token to int8, multiplied and rescaled.

The product is `torch.ops.vla_runtime.w4a8_matmul` (graphs/w4a8_kernel.py): on CUDA a Triton kernel that
unpacks the 4-bit weights in registers (no unpacked copy in memory), elsewhere the same integer sums in
float32 matmuls.
"""

from __future__ import annotations

import torch
from torch import nn

from .duquant import Smoothing
from .int8 import quantize_per_row
from .w4a8_kernel import pack_int4, w4a8_matmul

INT4_MAX = 7
DEFAULT_GROUP = 128


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
        y = w4a8_matmul(q, x_scale, self.weight_packed, self.weight_scales, x.dtype)
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
