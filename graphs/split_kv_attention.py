"""Split-KV ("flash-decoding") attention in Triton, for grouped queries over two key sources.

The denoising loop attends 50 suffix queries per head (8 heads, one KV head: 400 rows once the heads are
folded) to ~1000 keys held in two places: the prefix's KV cache and the suffix's own keys. Written as two
GEMMs around a softmax (`layers.grouped_attention`), that costs a concatenation of the cache per layer
and step, GEMMs on a key length that is not a multiple of 8 (cuBLAS falls back to slow 2-element-aligned
kernels) and a separate softmax kernel: ~17 us per layer on an H100. Here one kernel reads both sources
in place, each program taking a block of query rows and one slice of the keys (so ~100 programs fill
the GPU although there are only 400 rows), and a second kernel merges the slices' partial softmaxes and
writes the output already in [B, T, Hq * Dh] layout.

Numerics: scores and the online softmax in float32, probabilities cast to the value dtype for the
second product (as the eager path casts them), output in the query dtype.

Only used on CUDA with Triton importable (`available()`); everything else runs `grouped_attention`.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager attention serves
    triton = None

BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # keys per inner step


def available(device: torch.device | str) -> bool:
    return triton is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _attend(q, k_ptr, v_ptr, bias_ptr, row_ok, lo, hi, m_i, l_i, acc, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Online softmax over keys [lo, hi) of one source (rows [n, HEAD_DIM] contiguous)."""
        d = tl.arange(0, HEAD_DIM)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            key_ok = n < hi
            k = tl.load(k_ptr + n[None, :] * HEAD_DIM + d[:, None], mask=key_ok[None, :], other=0.0)
            s = tl.dot(q, k) * qk_scale  # log2 domain: exp2 below
            bias = tl.load(bias_ptr + n[None, :], mask=row_ok[:, None] & key_ok[None, :], other=float("-inf"))
            s = s + bias.to(tl.float32) * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + n[:, None] * HEAD_DIM + d[None, :], mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _partial_attention(
        Q, K1, V1, K2, V2, Bias, PartO, PartM, PartL, Out, so_b, so_t,
        rows, seq_q, groups, len1, len2, keys_per_split, qk_scale,
        sq_b, sq_h, sq_t, sk1_b, sk1_h, sk2_b, sk2_h, sbias_b, sbias_m, num_kv_heads,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    ):  # fmt: skip
        pid_m, split, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, kvh = bh // num_kv_heads, bh % num_kv_heads
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded row = group * seq_q + t
        d = tl.arange(0, HEAD_DIM)
        row_ok = r < rows
        head = kvh * groups + r // seq_q
        q_ptr = Q + b * sq_b + head[:, None] * sq_h + (r % seq_q)[:, None] * sq_t + d[None, :]
        q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # This program's slice [lo, hi) of the keys [K1 | K2]; each part may be empty.
        lo = split * keys_per_split
        hi = lo + keys_per_split
        bias_row = Bias + b * sbias_b + r[:, None] * sbias_m
        m_i, l_i, acc = _attend(
            q, K1 + b * sk1_b + kvh * sk1_h, V1 + b * sk1_b + kvh * sk1_h, bias_row, row_ok,
            tl.minimum(lo, len1), tl.minimum(hi, len1), m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_N,
        )  # fmt: skip
        m_i, l_i, acc = _attend(
            q, K2 + b * sk2_b + kvh * sk2_h, V2 + b * sk2_b + kvh * sk2_h, bias_row + len1, row_ok,
            tl.maximum(lo - len1, 0), tl.minimum(hi - len1, len2), m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_N,
        )  # fmt: skip
        if SINGLE_SPLIT:  # nothing to merge: normalise and write the output directly
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            out_ptr = Out + b * so_b + (r % seq_q)[:, None] * so_t + head[:, None] * HEAD_DIM + d[None, :]
            tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
            return
        part = (bh * tl.num_programs(1) + split) * rows + r
        tl.store(PartO + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(PartM + part, m_i, mask=row_ok)
        tl.store(PartL + part, l_i, mask=row_ok)

    @triton.jit
    def _merge_splits(
        PartO, PartM, PartL, Out, rows, seq_q, groups, splits, so_b, so_t, num_kv_heads,
        HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        """One program per row: every split's partial result in one [SPLITS, HEAD_DIM] load."""
        r, bh = tl.program_id(0), tl.program_id(1)
        b, kvh = bh // num_kv_heads, bh % num_kv_heads
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        split_ok = sp < splits
        part = (bh * splits + sp) * rows + r
        m = tl.load(PartM + part, mask=split_ok, other=float("-inf"))
        m_max = tl.max(m, 0)
        w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
        l_sum = tl.sum(w * tl.load(PartL + part, mask=split_ok, other=0.0), 0)
        o = tl.load(PartO + part[:, None] * HEAD_DIM + d[None, :], mask=split_ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
        head = kvh * groups + r // seq_q
        tl.store(Out + b * so_b + (r % seq_q) * so_t + head * HEAD_DIM + d, out.to(Out.dtype.element_ty))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("vla_runtime::split_kv_attention", mutates_args=())
def split_kv_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """softmax(q [k1 | k2]^T / sqrt(Dh) + bias) [v1 | v2], grouped queries, no concatenation.

    q [B, Hq, T, Dh]; k1/v1 [B, Hkv, S1, Dh] (the prefix cache); k2/v2 [B, Hkv, S2, Dh] (S2 may be 0);
    bias [B, 1, G*T, >= S1+S2] additive (0 / -inf), rows in `grouped_attention`'s folded order.
    Returns [B, T, Hq * Dh] in q's dtype.
    """
    return launch(q, k1, v1, k2, v2, bias)


def launch(q, k1, v1, k2, v2, bias, block_m=BLOCK_M, block_n=BLOCK_N, num_warps=8, num_stages=2):
    """`split_kv_attention` with its tile sizes open (benchmarks/attention_experiments.py sweeps them)."""
    b, hq, t, d = q.shape
    hkv, len1, len2 = k1.shape[1], k1.shape[2], k2.shape[2]
    groups, rows = hq // hkv, (hq // hkv) * t
    if d & (d - 1) or d < 16:
        raise ValueError(f"split_kv_attention: head_dim must be a power of two >= 16, got {d}")
    q, bias = _last_dim_contiguous(q), _last_dim_contiguous(bias)
    k1, v1, k2, v2 = (
        x if x.stride(-2) == d and x.stride(-1) == 1 else x.contiguous() for x in (k1, v1, k2, v2)
    )
    if v1.stride()[:2] != k1.stride()[:2] or v2.stride()[:2] != k2.stride()[:2]:
        v1, v2 = v1.contiguous(), v2.contiguous()
        k1, k2 = k1.contiguous(), k2.contiguous()
    m_blocks = triton.cdiv(rows, block_m)
    # Slice the keys so that roughly one wave of programs covers every SM.
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    wanted = max(1, sms // (m_blocks * b * hkv))
    keys_per_split = max(block_n, triton.cdiv(triton.cdiv(len1 + len2, wanted), block_n) * block_n)
    splits = triton.cdiv(len1 + len2, keys_per_split)
    out = torch.empty(b, t, hq * d, dtype=q.dtype, device=q.device)
    single = splits == 1
    part_rows = 1 if single else b * hkv * splits * rows
    part_o = torch.empty(part_rows, d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(part_rows, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _partial_attention[(m_blocks, splits, b * hkv)](
        q, k1, v1, k2, v2, bias, part_o, part_m, part_l, out, out.stride(0), out.stride(1),
        rows, t, groups, len1, len2, keys_per_split, 1.4426950408889634 / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(2), k1.stride(0), k1.stride(1), k2.stride(0), k2.stride(1),
        bias.stride(0), bias.stride(2), hkv,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_SPLIT=single, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if single:
        return out
    _merge_splits[(rows, b * hkv)](
        part_o, part_m, part_l, out, rows, t, groups, splits, out.stride(0), out.stride(1), hkv,
        HEAD_DIM=d, SPLITS=triton.next_power_of_2(splits), num_warps=4,
    )  # fmt: skip
    return out


@split_kv_attention.register_fake
def _(q, k1, v1, k2, v2, bias):
    b, hq, t, d = q.shape
    return q.new_empty(b, t, hq * d)
