"""The W4A8 product as one operator, `torch.ops.vla_runtime.w4a8_matmul`: int8 activations times 4-bit
weights packed two per byte, each group of `group` input channels with its own weight scale.

    y[m, n] = x_scale[m] * sum_g w_scale[n, g] * sum_{k in group g} x_q[m, k] * w_q[n, k]

On CUDA it is a Triton kernel that reads the packed bytes and unpacks them in registers (no unpacked copy
in memory): per group, two int8 tensor-core products (the even input channels against the low nibbles,
the odd ones against the high nibbles) accumulate in int32, which is exact; the group's sum is scaled into
a float32 accumulator; the token's scale is applied once at the end.
Elsewhere (and on CUDA without Triton) the same sums run as float32 matmuls per group: every partial sum
is an integer below 2^24 (group <= 1024: 1024 * 127 * 8 < 2^24), so float32 holds it exactly and the two
paths differ only in the order the group sums are added.

A custom operator so that torch.compile and CUDA graphs take it as one opaque call.
"""

from __future__ import annotations

import torch

try:  # the GPU image has Triton; the CPU-only install does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent (CI)
    triton = None


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


def reference_w4a8_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, out_dtype
) -> torch.Tensor:
    """The operator in float32 matmuls, one group at a time (exact integer partial sums)."""
    rows, k = x_q.shape
    groups = w_scale.shape[1]
    group = k // groups
    w_q = unpack_int4(packed).float()
    x = x_q.float()
    y = x.new_zeros(rows, packed.shape[0])
    for g in range(groups):
        cols = slice(g * group, (g + 1) * group)
        y += (x[:, cols] @ w_q[:, cols].T) * w_scale[:, g]
    return (y * x_scale.reshape(rows, 1)).to(out_dtype)


if triton is not None:

    @triton.jit
    def _w4a8_kernel(
        x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, y_ptr,
        rows, cols, groups,
        stride_x, stride_w, stride_ws, stride_y,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        pair = tl.arange(0, GROUP // 2)  # byte j of a group holds input channels 2j (low) and 2j + 1 (high)
        m_ok = m[:, None] < rows
        n_ok = n[None, :] < cols
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, groups):
            x_row = x_ptr + m[:, None] * stride_x + g * GROUP + 2 * pair[None, :]
            x_even = tl.load(x_row, mask=m_ok, other=0)
            x_odd = tl.load(x_row + 1, mask=m_ok, other=0)
            packed = tl.load(
                w_ptr + n[None, :] * stride_w + g * (GROUP // 2) + pair[:, None], mask=n_ok, other=0
            )
            signed = packed.to(tl.int8, bitcast=True)
            low = (signed << 4) >> 4  # arithmetic shifts sign-extend each nibble
            high = signed >> 4
            part = tl.dot(x_even, low, out_dtype=tl.int32)
            part = tl.dot(x_odd, high, acc=part, out_dtype=tl.int32)
            w_scale = tl.load(w_scale_ptr + n * stride_ws + g, mask=n < cols, other=0.0)
            acc += part.to(tl.float32) * w_scale[None, :]
        x_scale = tl.load(x_scale_ptr + m, mask=m < rows, other=0.0)
        y = acc * x_scale[:, None]
        tl.store(y_ptr + m[:, None] * stride_y + n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


def kernel_supports(k: int, group: int) -> bool:
    """The Triton kernel's shape needs: a power-of-two group of at least 64 (32 int8 per tensor-core K)."""
    return triton is not None and group >= 64 and group & (group - 1) == 0 and k % group == 0


def block_sizes(rows: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the action expert's 50-row products in one row block; the prefix's in 64s."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return block_m, 64


def triton_w4a8_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, out_dtype
) -> torch.Tensor:
    rows, k = x_q.shape
    cols, groups = packed.shape[0], w_scale.shape[1]
    y = torch.empty(rows, cols, dtype=out_dtype, device=x_q.device)
    block_m, block_n = block_sizes(rows)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _w4a8_kernel[grid](
        x_q, x_scale, packed, w_scale, y,
        rows, cols, groups,
        x_q.stride(0), packed.stride(0), w_scale.stride(0), y.stride(0),
        GROUP=k // groups, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3,
    )  # fmt: skip
    return y


@torch.library.custom_op("vla_runtime::w4a8_matmul", mutates_args=())
def w4a8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x_q int8 [M, K], x_scale float32 [M] or [M, 1], packed uint8 [N, K / 2], w_scale float32 [N, K / group]
    -> [M, N] in out_dtype."""
    x_scale = x_scale.reshape(-1).contiguous()
    k = x_q.shape[1]
    if x_q.is_cuda and kernel_supports(k, k // w_scale.shape[1]):
        return triton_w4a8_matmul(x_q.contiguous(), x_scale, packed, w_scale.contiguous(), out_dtype)
    return reference_w4a8_matmul(x_q, x_scale, packed, w_scale, out_dtype)


@w4a8_matmul.register_fake
def _(x_q, x_scale, packed, w_scale, out_dtype):
    return x_q.new_empty(x_q.shape[0], packed.shape[0], dtype=out_dtype)
