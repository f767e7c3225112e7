"""The Triton split-KV attention kernel against the eager attention in float32, fresh random inputs: the
pi05 denoise and prefix shapes, and a general one (batch 2, two KV heads, ragged lengths); masked keys,
whole masked key blocks and rows that see a single key."""

from __future__ import annotations

import pytest
import torch
from vla_runtime.graphs.layers import attention_bias, grouped_attention
from vla_runtime.graphs.split_kv_attention import split_kv_attention

CASES = {
    # name: batch, query heads, KV heads, queries, prefix keys, suffix keys, head dim, dtype
    "pi05-denoise": (1, 8, 1, 50, 968, 50, 256, torch.bfloat16),
    "pi05-prefix": (1, 8, 1, 968, 968, 0, 256, torch.bfloat16),
    "general-fp16": (2, 4, 2, 11, 77, 5, 64, torch.float16),
    "tiny": (1, 2, 1, 11, 30, 11, 16, torch.bfloat16),
}


def random_allowed(b: int, t: int, s: int, device) -> torch.Tensor:
    allowed = torch.rand(b, t, s, device=device) > 0.3
    if s > 192:
        allowed[:, :, 64:192] = False  # whole key blocks with nothing allowed
    allowed[:, :, 0] = True  # every row allows at least one key
    allowed[:, 0, :] = False
    allowed[:, 0, s - 1] = True  # a row that sees one key, the last
    return allowed


@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_attention(cuda, case):
    b, hq, hkv, t, s1, s2, d, dtype = CASES[case]
    rand = lambda *shape: torch.randn(*shape, device=cuda)  # noqa: E731
    q, k1, v1, k2, v2 = (
        rand(b, hq, t, d),
        rand(b, hkv, s1, d),
        rand(b, hkv, s1, d),
        rand(b, hkv, s2, d),
        rand(b, hkv, s2, d),
    )
    # Non-contiguous inputs, as the model passes them (q and the suffix keys are transposed views).
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    bias = attention_bias(random_allowed(b, t, s1 + s2, cuda), hq // hkv, torch.float32)
    expected = grouped_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), bias)
    low = [x.to(dtype) for x in (q, k1, v1, k2, v2)]
    # The model pads the bias rows to a multiple of 8 keys: the kernel reads only the first s1 + s2.
    padded = torch.cat([bias, bias.new_full((*bias.shape[:3], 5), float("-inf"))], dim=3)
    got = split_kv_attention(*low, padded.to(dtype))
    eager_low = grouped_attention(low[0], torch.cat(low[1:4:2], 2), torch.cat(low[2:5:2], 2), bias.to(dtype))
    scale = expected.abs().max()
    err = float((got.float() - expected).abs().max() / scale)
    eager_err = float((eager_low.float() - expected).abs().max() / scale)
    print(f"{case}: split-KV {err:.2e}, eager {dtype} {eager_err:.2e} (max error relative to max |out|)")
    assert got.shape == expected.shape and got.dtype == dtype
    assert err <= max(1.5 * eager_err, 4e-3)


def test_inside_a_cuda_graph(cuda):
    """Captured and replayed with new inputs, as the executor runs it."""
    b, hq, hkv, t, s1, s2, d, dtype = CASES["pi05-denoise"]
    q, k1, v1 = (
        torch.randn(b, h, n, d, device=cuda, dtype=dtype) for h, n in ((hq, t), (hkv, s1), (hkv, s1))
    )
    k2, v2 = (torch.randn(b, hkv, s2, d, device=cuda, dtype=dtype) for _ in range(2))
    bias = attention_bias(random_allowed(b, t, s1 + s2, cuda), hq // hkv, dtype)
    split_kv_attention(q, k1, v1, k2, v2, bias)  # compile the kernels outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = split_kv_attention(q, k1, v1, k2, v2, bias)
    for _ in range(2):
        for x in (q, k1, v1, k2, v2):
            x.normal_()
        graph.replay()
        expected = grouped_attention(
            q.float(), torch.cat([k1, k2], 2).float(), torch.cat([v1, v2], 2).float(), bias.float()
        )
        assert float((out.float() - expected).abs().max() / expected.abs().max()) < 2e-2
