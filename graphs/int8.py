"""INT8 GEMMs (W8A8) for GPUs without FP8: Ampere's INT8 tensor cores (Jetson Orin, A100), and any CPU.

Weights are quantised once, at load, per output channel (symmetric, 127 levels each side); activations
per token at run time (each row's largest magnitude over 127), so nothing needs calibrating and an
outlier token costs only its own row's resolution. The product runs in integers (`torch._int_mm`, int32
accumulation) and is rescaled by the two scales: y[m, n] = acc[m, n] * x_scale[m] * w_scale[n].

`torch._int_mm` on CUDA wants more than 16 rows and K, N multiples of 8: every GEMM of pi0 / pi0.5 meets
that (50 action rows, a prefix of hundreds of tokens); shorter inputs are padded with zero rows.
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX = 127.0
MIN_ROWS_CUDA = 17  # torch._int_mm on CUDA: more than 16 rows


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], scale [M, 1] float32): symmetric, each row its own scale."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=1e-12)
    return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T with W int8 per output channel and x int8 per token; output in x's dtype."""

    observing = False  # the FP8 path's calibration flag: nothing is calibrated here

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % 8 or self.out_features % 8:
            raise ValueError(f"int8: GEMM dims must be multiples of 8, got {tuple(weight.shape)}")
        q, scale = quantize_per_row(weight.detach())  # a row of W is an output channel
        # [N, K] row-major, given to _int_mm transposed (column-major [K, N]): the "TN" layout cuBLASLt's
        # int8 kernels take on every GPU generation (a row-major [K, N] is refused on Ampere)
        self.register_buffer("weight_int8", q.contiguous(), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1), persistent=False)  # [1, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if flat.is_cuda and rows < MIN_ROWS_CUDA:
            flat = torch.cat([flat, flat.new_zeros(MIN_ROWS_CUDA - rows, self.in_features)])
        q, x_scale = quantize_per_row(flat)
        acc = torch._int_mm(q, self.weight_int8.t())[:rows]
        y = acc.float() * x_scale[:rows] * self.weight_scale
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes of weights one application reads (the int8 matrix and its scales)."""
        return self.weight_int8.numel() + self.weight_scale.numel() * 4
