"""FP8 GEMMs for few rows (the action expert's 50 per robot), split along K so that the whole GPU reads
the weights at once.

At 50 rows a cuBLAS FP8 GEMM of the expert (K = 1024 to 4096, N = 1024 to 2560) takes 3.5-7.4 us while
its weights need 0.3-2.8 us of bandwidth: it runs on a few dozen thread blocks, each walking all of K,
one DRAM round trip after another. This kernel gives each program a slice of K as well as of N (many
more programs, each with a short walk) and writes float32 partial products [S, M, N]; the caller adds
the S slices with plain adds, which Inductor fuses into the kernel that reads the GEMM's output next
(RoPE for q/k/v, the gated residual and the next norm for the output and down projections), so the
split costs no kernel of its own. The input may be FP8 already, or bf16 that the kernel casts with the
GEMM's input scale as it loads it (what `FP8Linear.quantize` does in a kernel of its own).

CUDA and Triton only, like graphs/fp8_geglu.py: `available(device)` says whether it can run.
"""

from __future__ import annotations

import torch

try:  # Triton comes with torch's CUDA wheels; the CPU-only environments (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

E4M3_MAX = 448.0
MAX_ROWS = 128  # above this, cuBLAS's tiles fill the GPU and its GEMM wins


def available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "the split-K FP8 kernel needs a CUDA GPU"
    if triton is None:
        return False, "the split-K FP8 kernel needs Triton (installed with torch's CUDA wheels)"
    return True, ""


# (N, K) -> (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages); other shapes take DEFAULT_CONFIG where K allows.
# Chosen by benchmarks/skinny_gemm_experiment.py on the H200 (each weight read from DRAM, in a graph).
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}
DEFAULT_CONFIG = (32, 128, 4, 4, 3)


def config_for(n: int, k: int) -> tuple[int, int, int, int, int]:
    block_n, block_k, split, warps, stages = CONFIGS.get((n, k), DEFAULT_CONFIG)
    while split > 1 and k % (split * block_k):
        split //= 2
    return block_n, block_k, split, warps, stages


def supports(rows: int, n: int, k: int) -> bool:
    block_n, block_k, split, _, _ = config_for(n, k)
    return rows <= MAX_ROWS and n % block_n == 0 and k % (split * block_k) == 0


if triton is not None:

    @triton.jit
    def _split_k_kernel(
        x_ptr,  # [M, K] float8 e4m3 or bf16, row-major
        w_ptr,  # [N, K] float8 e4m3, row-major
        out_ptr,  # [SPLIT_K, M, N] float32: the partial products, scaled
        x_scale_ptr,
        w_scale_ptr,
        M,
        N,
        K,
        CAST_INPUT: tl.constexpr,  # x is bf16: cast it to FP8 with x_scale as it is loaded
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * (K // SPLIT_K) + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]
        w_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N], K-major as FP8 MMA needs
        x_scale = tl.load(x_scale_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K * SPLIT_K):  # this program's K // SPLIT_K
            a = tl.load(x_ptrs, mask=rows[:, None] < M, other=0.0)
            if CAST_INPUT:
                a = tl.minimum(tl.maximum(a.to(tl.float32) / x_scale, -448.0), 448.0).to(tl.float8e4nv)
            acc = tl.dot(a, tl.load(w_ptrs), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * (x_scale * tl.load(w_scale_ptr))
        out_ptrs = out_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out_ptrs, acc, mask=rows[:, None] < M)


@torch.library.custom_op("vla_runtime::fp8_split_k", mutates_args=())
def fp8_split_k(
    x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (FP8 e4m3, or bf16 to be cast with x_scale) times weight [N, K] (FP8 e4m3) ->
    float32 partial products [S, M, N] whose sum over S is (x * x_scale) (weight * w_scale)^T."""
    ok, why = available(x.device)
    if not ok:
        raise RuntimeError(f"fp8_split_k: {why}")
    m, k = x.shape
    n = weight.shape[0]
    if not supports(m, n, k) or weight.shape[1] != k or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(
            f"fp8_split_k: needs contiguous x [M <= {MAX_ROWS}, K] and weight [N, K] that its tiles divide, "
            f"got {list(x.shape)} and {list(weight.shape)}"
        )
    block_n, block_k, split, warps, stages = config_for(n, k)
    out = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    _split_k_kernel[(n // block_n, split)](
        x,
        weight,
        out,
        x_scale,
        w_scale,
        m,
        n,
        k,
        CAST_INPUT=x.dtype != torch.float8_e4m3fn,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@fp8_split_k.register_fake
def _fp8_split_k_fake(x, weight, x_scale, w_scale):
    split = config_for(weight.shape[0], x.shape[1])[2]
    return x.new_empty(split, x.shape[0], weight.shape[0], dtype=torch.float32)


def sum_of_slices(partials: torch.Tensor) -> torch.Tensor:
    """[S, M, N] -> [M, N], as S - 1 adds of whole slices: pointwise, so Inductor fuses them into the
    kernel that reads the sum (a reduction over S would be a kernel of its own)."""
    total = partials[0]
    for i in range(1, partials.shape[0]):
        total = total + partials[i]
    return total
