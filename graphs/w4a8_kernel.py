"""The W4A8 product as one operator, `torch.ops.vla_runtime.w4a8_matmul`: int8 activations times 4-bit
weights packed two per byte, each group of `group` input channels with its own weight scale.

    y[m, n] = x_scale[m] * sum_g w_scale[n, g] * sum_{k in group g} x_q[m, k] * w_q[n, k]

Packing: byte j of a row holds input channel j in its low nibble and channel j + K/2 in its high one, so
a run of `group` bytes holds two whole groups, each against a contiguous run of the input.

On CUDA it is a Triton kernel that reads the packed bytes and unpacks them in registers (no unpacked copy
in memory): per run of `group` bytes, two int8 tensor-core products (the low nibbles' group, the high
nibbles' group) accumulate in int32, which is exact; each group's sum is scaled into a float32
accumulator; the token's scale is applied once at the end. At the action expert's 50 rows one block of
rows and a few dozen column blocks would leave most of the GPU idle, so the runs are split over more
programs (split-K) whose float32 partial sums are added after.
Elsewhere (and on CUDA without Triton, or for a group the kernel does not take) the same sums run as
float32 matmuls per group: every partial sum is an integer below 2^24 (for any group up to 1024:
1024 * 127 * 8 < 2^24), so float32 holds it exactly and the two paths differ only in the order the group
sums are added.

A custom operator so that torch.compile and CUDA graphs take it as one opaque call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:  # the GPU image has Triton; the CPU-only install does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent (CI)
    triton = None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7], K even -> uint8 [N, K / 2]: column j in the low nibble of byte j,
    column j + K/2 in its high one (two's complement)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4: an even number of columns is needed, got {q.shape[-1]}")
    if q.min() < -8 or q.max() > 7:
        raise ValueError("int4: values must lie in [-8, 7]")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    half = q.shape[-1] // 2
    return nibbles[..., :half] | (nibbles[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [N, K / 2] -> int8 [N, K]."""
    values = torch.cat([(packed & 0xF), (packed >> 4)], dim=-1).to(torch.int16)
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
        rows, cols, runs, runs_per_split,
        stride_x, stride_w, stride_ws, stride_ys, stride_y,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, GROUP)
        m_ok = m[:, None] < rows
        n_ok = n[None, :] < cols
        half = runs * GROUP  # K / 2: the high nibbles' channels start here
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = split * runs_per_split
        for r in range(first, tl.minimum(first + runs_per_split, runs)):
            x_row = x_ptr + m[:, None] * stride_x + r * GROUP + j[None, :]
            x_low = tl.load(x_row, mask=m_ok, other=0)
            x_high = tl.load(x_row + half, mask=m_ok, other=0)
            packed = tl.load(w_ptr + n[None, :] * stride_w + r * GROUP + j[:, None], mask=n_ok, other=0)
            signed = packed.to(tl.int8, bitcast=True)
            low = (signed << 4) >> 4  # arithmetic shifts sign-extend each nibble
            high = signed >> 4
            scale_low = tl.load(w_scale_ptr + n * stride_ws + r, mask=n < cols, other=0.0)
            scale_high = tl.load(w_scale_ptr + n * stride_ws + runs + r, mask=n < cols, other=0.0)
            acc += tl.dot(x_low, low, out_dtype=tl.int32).to(tl.float32) * scale_low[None, :]
            acc += tl.dot(x_high, high, out_dtype=tl.int32).to(tl.float32) * scale_high[None, :]
        x_scale = tl.load(x_scale_ptr + m, mask=m < rows, other=0.0)
        y = acc * x_scale[:, None]
        out = y_ptr + split * stride_ys + m[:, None] * stride_y + n[None, :]
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


MAX_GROUP = 256  # larger groups overflow shared memory with these tiles (512 needs 320 KiB of 227)


@dataclass(frozen=True)
class LaunchShape:
    block_m: int
    block_n: int
    splits: int  # programs along K, each adding `runs_per_split` runs of bytes
    runs_per_split: int


def kernel_supports(k: int, group: int) -> bool:
    """The Triton kernel's shape needs: a power-of-two group of 32 (int8 tensor-core K) to MAX_GROUP and an
    even number of groups (a byte holds a channel of each half)."""
    return (
        triton is not None and 32 <= group <= MAX_GROUP and group & (group - 1) == 0 and k % (2 * group) == 0
    )


def launch_shape(rows: int, cols: int, runs: int, sms: int) -> LaunchShape:
    """The expert's 50-row products in one row block, split over K until about `sms` programs run (the
    GPU is about full); the prefix's hundreds of rows fill it without."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64
    tiles = -(-rows // block_m) * -(-cols // block_n)
    wanted = max(1, min(runs, sms // tiles))
    runs_per_split = -(-runs // wanted)
    return LaunchShape(block_m, block_n, -(-runs // runs_per_split), runs_per_split)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_w4a8_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, out_dtype
) -> torch.Tensor:
    rows, k = x_q.shape
    cols, groups = packed.shape[0], w_scale.shape[1]
    group, runs = k // groups, groups // 2
    shape = launch_shape(rows, cols, runs, multiprocessors(x_q.device))
    y = torch.empty(
        shape.splits, rows, cols, dtype=out_dtype if shape.splits == 1 else torch.float32, device=x_q.device
    )
    grid = (triton.cdiv(rows, shape.block_m), triton.cdiv(cols, shape.block_n), shape.splits)
    with torch.cuda.device(x_q.device):  # Triton launches on the current device, not the tensors'
        _w4a8_kernel[grid](
            x_q, x_scale, packed, w_scale, y,
            rows, cols, runs, shape.runs_per_split,
            x_q.stride(0), packed.stride(0), w_scale.stride(0), y.stride(0), y.stride(1),
            GROUP=group, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n, num_warps=4, num_stages=3,
        )  # fmt: skip
    return y[0] if shape.splits == 1 else y.sum(0).to(out_dtype)


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
        return triton_w4a8_matmul(
            x_q.contiguous(), x_scale, packed.contiguous(), w_scale.contiguous(), out_dtype
        )
    return reference_w4a8_matmul(x_q, x_scale, packed, w_scale, out_dtype)


@w4a8_matmul.register_fake
def _(x_q, x_scale, packed, w_scale, out_dtype):
    return x_q.new_empty(x_q.shape[0], packed.shape[0], dtype=out_dtype)
