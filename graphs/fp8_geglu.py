"""The Gemma MLP's first half in one FP8 kernel: gate/up GEMM, GeGLU and the FP8 cast for the down GEMM.

Without it the fused gate/up projection is a cuBLAS FP8 GEMM writing bf16 [M, 2N], and a second kernel
reads that back, applies gelu(gate) * up and casts to FP8 for the down projection. cuBLAS has no gated
epilogue, so this Triton kernel computes the gate and up tiles of the same rows together, applies the
GeGLU to its float32 accumulators and stores FP8 directly. Measured on an H100 against cuBLAS plus
Inductor's GeGLU kernel (`benchmarks/geglu_gemm_experiment.py`): 137 against 150 us at the prefix's shape
(968 x 2048 -> 16384), 4.3 against 6.4 us at the action expert's (50 x 1024 -> 4096), same accuracy.

CUDA only, and only where Triton is installed (it ships with torch's CUDA wheels, not its CPU ones):
`available(device)` says whether it can run; elsewhere GemmaMLP keeps the two-kernel path. It is an
opaque operator to torch.compile: Inductor computes the FP8 input before it and the down GEMM after it.
"""

from __future__ import annotations

import inspect

import torch

try:  # Triton comes with torch's CUDA wheels; the CPU-only environments (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

E4M3_MAX = 448.0


def available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "the fused FP8 GeGLU kernel needs a CUDA GPU"
    if triton is None:
        return False, "the fused FP8 GeGLU kernel needs Triton (installed with torch's CUDA wheels)"
    return True, ""


if triton is not None:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per row count. Few rows (the action expert's 50) get one
    # fixed configuration: autotuning between near-equal candidates picked different ones from run to run,
    # some far slower inside the denoise graph (weights then come from DRAM, not the tuner's warm L2).
    # Candidates too large for a GPU's shared memory are skipped by the autotuner.
    FEW_ROWS = 128
    _FEW_ROWS_CONFIGS = [(64, 32, 128, 4, 5)]  # the H100's best at 50 rows in every run
    _MANY_ROWS_CONFIGS = [
        (128, 128, 128, 8, 3),
        (128, 128, 128, 8, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 3),
    ]

    def _config(m, n, k, warps, stages):
        meta = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
        return triton.Config(meta, num_warps=warps, num_stages=stages)

    def _shape(config) -> tuple:
        kw = config.kwargs
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages

    def _for_row_count(configs, named_args, **kwargs):
        wanted = _FEW_ROWS_CONFIGS if named_args["M"] < FEW_ROWS else _MANY_ROWS_CONFIGS
        return [c for c in configs if _shape(c) in wanted]

    # The timings are kept in Triton's cache (where it can): a start then skips the benchmark, 0.7 s of a
    # warm pi05 start on the H200.
    _KEEP_TIMINGS = (
        {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    )

    @triton.autotune(
        configs=[_config(*c) for c in _FEW_ROWS_CONFIGS + _MANY_ROWS_CONFIGS],
        key=["M", "N", "K", "OUT_M"],
        prune_configs_by={"early_config_prune": _for_row_count},
        **_KEEP_TIMINGS,
    )
    @triton.jit
    def _fp8_geglu_kernel(
        x_ptr,  # [M, K] float8 e4m3, row-major
        w_ptr,  # [2N, K] float8 e4m3, row-major: rows [0, N) gate, [N, 2N) up
        out_ptr,  # [M, N] float8 e4m3
        x_scale_ptr,
        w_scale_ptr,
        out_scale_ptr,  # the down projection's input scale
        M,
        N,
        K,
        OUT_M,  # rows of out: M, or more when the down GEMM reads padded rows (written as zeros)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Programs walk the output in groups of GROUP_M row blocks, so neighbours share weight tiles in L2.
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(OUT_M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]
        gate_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N], K-major as FP8 MMA needs
        up_ptrs = gate_ptrs + N * K
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):  # K is a multiple of 256 (checked by fp8_geglu)
            a = tl.load(x_ptrs, mask=rows[:, None] < M, other=0.0)
            gate = tl.dot(a, tl.load(gate_ptrs), gate)
            up = tl.dot(a, tl.load(up_ptrs), up)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        scale = tl.load(x_scale_ptr) * tl.load(w_scale_ptr)
        gate = gate * scale
        up = up * scale
        # gelu with the tanh approximation: 0.5 * (1 + tanh(y)) == sigmoid(2y)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = gate * tl.sigmoid(2.0 * inner) * up / tl.load(out_scale_ptr)
        out = tl.minimum(tl.maximum(out, -448.0), 448.0)  # e4m3's largest finite value
        # rows from M to OUT_M loaded no input (zeros), so they store gelu(0) * 0 = 0
        tl.store(
            out_ptr + rows[:, None] * N + cols[None, :], out.to(tl.float8e4nv), mask=rows[:, None] < OUT_M
        )


@torch.library.custom_op("vla_runtime::fp8_geglu", mutates_args=())
def fp8_geglu(
    x: torch.Tensor,
    weight: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_scale: torch.Tensor,
    out_rows: int = -1,
) -> torch.Tensor:
    """FP8(gelu_tanh(x W_gate^T) * (x W_up^T) / out_scale), with x [M, K] and weight [2N, K] in FP8 e4m3
    (their real values are x * x_scale and weight * w_scale) -> [M, N] FP8 e4m3, or [out_rows, N] with
    zero rows after the M computed (-1: M)."""
    ok, why = available(x.device)
    if not ok:
        raise RuntimeError(f"fp8_geglu: {why}")
    m, k = x.shape
    n = weight.shape[0] // 2
    if k % 256 or weight.shape[1] != k or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(
            f"fp8_geglu: needs contiguous x [M, K] and weight [2N, K] with K a multiple of 256, "
            f"got {list(x.shape)} and {list(weight.shape)}"
        )
    out_rows = _out_rows(m, out_rows)
    out = torch.empty(out_rows, n, device=x.device, dtype=torch.float8_e4m3fn)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(out_rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
    )
    _fp8_geglu_kernel[grid](x, weight, out, x_scale, w_scale, out_scale, m, n, k, out_rows)
    return out


@fp8_geglu.register_fake
def _fp8_geglu_fake(x, weight, x_scale, w_scale, out_scale, out_rows=-1):
    return x.new_empty(_out_rows(x.shape[0], out_rows), weight.shape[0] // 2, dtype=torch.float8_e4m3fn)


def _out_rows(rows: int, out_rows: int) -> int:
    """The rows of fp8_geglu's output: `rows`, or `out_rows` (-1: rows), never fewer."""
    if out_rows < 0:
        return rows
    if out_rows < rows:
        raise ValueError(f"fp8_geglu: out_rows {out_rows} below the {rows} rows computed")
    return out_rows
