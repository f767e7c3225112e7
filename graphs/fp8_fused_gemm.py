"""The action expert's FP8 GEMMs with what lies between them fused in: one Triton kernel per GEMM.

Unfused, an FP8 expert layer runs twelve kernels per denoising step: four cuBLAS GEMMs, the fused GeGLU
kernel, three for attention, two RoPE kernels, and three small Inductor kernels that only prepare a GEMM's
input or finish its output (residual + RMSNorm + FP8 cast, twice, and the attention output's FP8 cast).
At 50 rows every kernel costs a few microseconds of fixed latency whatever it computes, so this module
moves those three into the GEMMs themselves:

    prologue  (what the kernel does to its input, per K tile, before the tensor-core product)
      FP8      the input is FP8 already (the down projection's, from the GeGLU epilogue)
      CAST     bf16 input cast to FP8 with the GEMM's calibrated scale (the output projection)
      NORM     RMSNorm of bf16 rows (pi0.5: adaptive, `normed * (1 + scale) + shift` per batch item;
               pi0: `normed * (1 + weight)`), rounded to bf16 as the unfused norm is, then cast to FP8
               (the q/k/v and gate/up projections)
    epilogue  (what it does to the float32 accumulator)
      PLAIN    bf16 output (q/k/v)
      GEGLU    gelu_tanh(gate) * up, cast to FP8 for the down projection (gate/up)
      RESIDUAL residual + gate * output in bf16, the gate per batch item (output and down projections)

The RMSNorm needs each row's mean square before the first tile: every program reads its rows once for
it (50 x 1024 bf16, from L2) and again in the main loop. Numerics follow the unfused path's compiled
form: norms in float32 rounded once to bf16, scales applied by division, the residual summed in float32
and rounded once.

One custom operator, `torch.ops.vla_runtime.fp8_fused_gemm`, opaque to torch.compile. CUDA only, where
Triton is installed (`available`); elsewhere the layers keep the unfused path. The CPU tests run the same
kernel in Triton's interpreter (TRITON_INTERPRET=1), against the unfused path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton comes with torch's CUDA wheels; the CPU-only environments have it only for its interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

PROLOGUES = {"fp8": 0, "cast": 1, "norm": 2}
EPILOGUES = {"plain": 0, "geglu": 1, "residual": 2}


def available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if triton is None:
        return False, "the fused FP8 expert GEMMs need Triton (installed with torch's CUDA wheels)"
    if device.type == "cuda" and torch.cuda.is_available():
        return True, ""
    if device.type == "cpu" and interpreting():
        return True, ""
    return False, "the fused FP8 expert GEMMs need a CUDA GPU (or Triton's interpreter, for tests)"


def interpreting() -> bool:
    """Triton's interpreter is on. It must be switched on before Triton is first imported (tests/conftest.py
    does where there is no GPU): Triton reads the switch when it wraps a kernel."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Tiles:
    """One kernel configuration. Few rows (the expert's 50 per robot) leave most SMs idle with large
    tiles, so the column tile is narrow and the K tile long."""

    block_m: int = 64
    block_n: int = 32
    block_k: int = 128
    warps: int = 4
    stages: int = 4


# Pinned per GEMM (its name in FP8_GEMMS) for the row counts of a few robots; `tiles_for` falls back to
# DEFAULT_TILES. Autotuning at 50 rows picked different configurations from run to run (graphs/fp8_geglu.py).
DEFAULT_TILES = Tiles()
PINNED_TILES: dict[str, Tiles] = {}
PROGRAMMATIC_LAUNCH = {"enabled": False}  # Hopper's programmatic dependent launch between kernels


def tiles_for(gemm: str) -> Tiles:
    return PINNED_TILES.get(gemm, DEFAULT_TILES)


def fused_linear(linear, x: torch.Tensor, prologue: str, epilogue: str, gemm: str, rows_per_item: int, **kw):
    """`fp8_fused_gemm` with an FP8Linear's weight and scales (graphs/fp8.py): x [..., K] -> [rows, N]; a
    residual [..., N] is flattened the same way."""
    if kw.get("residual") is not None:
        kw["residual"] = kw["residual"].reshape(-1, kw["residual"].shape[-1])
    return torch.ops.vla_runtime.fp8_fused_gemm(
        x.reshape(-1, x.shape[-1]).contiguous(),
        linear.weight_fp8.t(),  # the quantised [N, K] row-major weight
        linear.input_scale,
        linear.weight_scale,
        prologue,
        epilogue,
        gemm,
        rows_per_item,
        **kw,
    )


if triton is not None:

    @triton.jit
    def _fp8_fused_gemm_kernel(
        x_ptr,  # [M, K]: FP8 e4m3 (prologue FP8) or bf16
        w_ptr,  # [N_w, K] FP8 e4m3, row-major; GEGLU: rows [0, N) gate, [N, 2N) up
        out_ptr,  # [M, N]: bf16, or FP8 e4m3 (GEGLU)
        x_scale_ptr,
        w_scale_ptr,
        out_scale_ptr,  # GEGLU: the next GEMM's input scale
        norm_scale_ptr,  # NORM: [items, K] (row stride norm_stride; 0 for a norm weight shared by all)
        norm_shift_ptr,  # NORM with HAS_SHIFT: [items, K], same stride
        norm_stride,
        residual_ptr,  # RESIDUAL: [M, N] bf16
        gate_ptr,  # RESIDUAL with HAS_GATE: [items, N] (row stride gate_stride)
        gate_stride,
        M,
        N,
        K,
        rows_per_item,  # rows of one batch item (the suffix length): row r belongs to item r // rows_per_item
        eps,
        PROLOGUE: tl.constexpr,
        EPILOGUE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        HAS_GATE: tl.constexpr,
        USE_PDL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Consecutive programs share a row block and walk the weight's column blocks.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < N
        item = rows // rows_per_item
        if USE_PDL:  # everything this kernel reads before here may still be being written
            tl.extra.cuda.gdc_wait()
        x_scale = tl.load(x_scale_ptr)

        if PROLOGUE == 2:  # each row's mean square, for the RMSNorm
            square_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_ptr + rows[:, None] * K + k0 + ks[None, :], mask=row_ok[:, None], other=0.0)
                x = x.to(tl.float32)
                square_sum += tl.sum(x * x, axis=1)
            inv_rms = 1.0 / tl.sqrt(square_sum / K + eps)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GEGLU only
        w_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N], K-major as FP8 MMA needs
        for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (checked by the wrapper)
            x_ptrs = x_ptr + rows[:, None] * K + k0 + ks[None, :]
            if PROLOGUE == 0:
                a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
                if PROLOGUE == 2:
                    norm_offsets = item[:, None] * norm_stride + k0 + ks[None, :]
                    scale = tl.load(norm_scale_ptr + norm_offsets, mask=row_ok[:, None], other=0.0)
                    x = x * inv_rms[:, None] * (1.0 + scale.to(tl.float32))
                    if HAS_SHIFT:
                        shift = tl.load(norm_shift_ptr + norm_offsets, mask=row_ok[:, None], other=0.0)
                        x = x + shift.to(tl.float32)
                    x = x.to(tl.bfloat16).to(tl.float32)  # the norm's output, as the unfused path rounds it
                a = tl.minimum(tl.maximum(x / x_scale, -448.0), 448.0).to(tl.float8e4nv)
            weights = tl.load(w_ptrs + k0, mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a, weights, acc)
            if EPILOGUE == 1:
                up_weights = tl.load(w_ptrs + N * K + k0, mask=col_ok[None, :], other=0.0)
                acc_up = tl.dot(a, up_weights, acc_up)
        if USE_PDL:  # the next kernel may start launching; it waits for this one's stores in its gdc_wait
            tl.extra.cuda.gdc_launch_dependents()

        scale = x_scale * tl.load(w_scale_ptr)
        out_mask = row_ok[:, None] & col_ok[None, :]
        out_offsets = rows[:, None] * N + cols[None, :]
        if EPILOGUE == 0:
            tl.store(out_ptr + out_offsets, (acc * scale).to(tl.bfloat16), mask=out_mask)
        elif EPILOGUE == 1:
            gate = acc * scale
            up = acc_up * scale
            # gelu with the tanh approximation: 0.5 * (1 + tanh(y)) == sigmoid(2y)
            inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            out = gate * tl.sigmoid(2.0 * inner) * up / tl.load(out_scale_ptr)
            out = tl.minimum(tl.maximum(out, -448.0), 448.0)  # e4m3's largest finite value
            tl.store(out_ptr + out_offsets, out.to(tl.float8e4nv), mask=out_mask)
        else:
            update = (acc * scale).to(tl.bfloat16).to(tl.float32)  # the GEMM's bf16 output, as unfused
            if HAS_GATE:
                gate = tl.load(
                    gate_ptr + item[:, None] * gate_stride + cols[None, :], mask=out_mask, other=0.0
                )
                update = update * gate.to(tl.float32)
            residual = tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_offsets, (residual + update).to(tl.bfloat16), mask=out_mask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"fp8_fused_gemm: {message}")


@torch.library.custom_op("vla_runtime::fp8_fused_gemm", mutates_args=())
def fp8_fused_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    prologue: str,
    epilogue: str,
    gemm: str,
    rows_per_item: int,
    out_scale: torch.Tensor | None = None,
    norm_scale: torch.Tensor | None = None,
    norm_shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (FP8, or bf16 for the cast and norm prologues) times weight [N_w, K] FP8 (real values
    x * x_scale, weight * w_scale), with a prologue and an epilogue from PROLOGUES / EPILOGUES (see the
    module's docstring). `gemm` names the GEMM for its pinned tiles. norm_scale / norm_shift / gate are
    [items, D] or, for a norm weight, [D] (shared by all rows); M = items * rows_per_item."""
    ok, why = available(x.device)
    if not ok:
        raise RuntimeError(f"fp8_fused_gemm: {why}")
    m, k = x.shape
    n = weight.shape[0] // 2 if epilogue == "geglu" else weight.shape[0]
    tiles = tiles_for(gemm)
    block_k = min(tiles.block_k, k)
    _check(weight.shape[1] == k and k % block_k == 0, f"K {k} must be a multiple of {block_k}")
    _check(x.is_contiguous() and weight.is_contiguous(), "x and weight must be contiguous")
    _check((x.dtype == torch.float8_e4m3fn) == (prologue == "fp8"), f"x is {x.dtype} for prologue {prologue}")
    _check(m % rows_per_item == 0, f"{m} rows are not whole items of {rows_per_item}")

    def row_stride(t: torch.Tensor | None, width: int, field: str) -> int:
        if t is None:
            return 0
        _check(t.shape[-1] == width and t.stride(-1) == 1, f"{field} must be [items, {width}], unit stride")
        return t.stride(0) if t.dim() == 2 else 0

    norm_stride = row_stride(norm_scale, k, "norm_scale")
    _check(norm_shift is None or row_stride(norm_shift, k, "norm_shift") == norm_stride, "shift stride")
    gate_stride = row_stride(gate, n, "gate")
    if epilogue == "residual":
        _check(
            residual is not None and residual.shape == (m, n) and residual.is_contiguous(), "residual [M, N]"
        )
    if prologue == "norm":
        _check(norm_scale is not None, "the norm prologue needs norm_scale")
    if epilogue == "geglu":
        _check(out_scale is not None, "the GeGLU epilogue needs out_scale")
    out_dtype = torch.float8_e4m3fn if epilogue == "geglu" else torch.bfloat16
    out = torch.empty(m, n, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    launch = {} if interpreting() else {"num_warps": tiles.warps, "num_stages": tiles.stages}
    pdl = PROGRAMMATIC_LAUNCH["enabled"] and not interpreting()
    if pdl:
        launch["launch_pdl"] = True
    _fp8_fused_gemm_kernel[grid](
        x,
        weight,
        out,
        x_scale,
        w_scale,
        out_scale if out_scale is not None else x_scale,
        norm_scale if norm_scale is not None else x_scale,
        norm_shift if norm_shift is not None else x_scale,
        norm_stride,
        residual if residual is not None else out,
        gate if gate is not None else x_scale,
        gate_stride,
        m,
        n,
        k,
        rows_per_item,
        eps,
        PROLOGUE=PROLOGUES[prologue],
        EPILOGUE=EPILOGUES[epilogue],
        HAS_SHIFT=norm_shift is not None,
        HAS_GATE=gate is not None,
        USE_PDL=pdl,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=block_k,
        **launch,
    )
    return out


@fp8_fused_gemm.register_fake
def _fp8_fused_gemm_fake(
    x, weight, x_scale, w_scale, prologue, epilogue, gemm, rows_per_item, *args, **kwargs
):
    n = weight.shape[0] // 2 if epilogue == "geglu" else weight.shape[0]
    dtype = torch.float8_e4m3fn if epilogue == "geglu" else torch.bfloat16
    return x.new_empty(x.shape[0], n, dtype=dtype)
