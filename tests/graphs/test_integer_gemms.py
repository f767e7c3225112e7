"""INT8 (W8A8) and W4A8 GEMMs with DuQuant smoothing, on the CPU with fresh random inputs: quantise /
dequantise round trips, packing exact, rotations orthogonal, the transform exact before quantisation, the
smoothing lowering the error where activations have outlier channels, and each GEMM against float32."""

from __future__ import annotations

import pytest
import torch
from vla_runtime.graphs.duquant import as_matrices, fit_smoothing, spreading_reflection, zigzag_permutation
from vla_runtime.graphs.int8 import Int8Linear, quantize_per_row
from vla_runtime.graphs.w4a8 import W4A8Linear, quantize_int4_grouped
from vla_runtime.graphs.w4a8_kernel import launch_shape, pack_int4, unpack_int4, w4a8_matmul


@pytest.fixture
def gen(rng):
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def activations(gen, rows: int, k: int, outliers: int = 0, scale: float = 40.0) -> torch.Tensor:
    """Gaussian rows; with `outliers`, that many channels `scale` times larger (as in LLM activations)."""
    x = torch.randn(rows, k, generator=gen)
    if outliers:
        channels = torch.randperm(k, generator=gen)[:outliers]
        x[:, channels] *= scale
    return x


def test_int8_per_row_round_trip_is_within_half_a_step(gen):
    x = torch.randn(37, 64, generator=gen) * torch.rand(37, 1, generator=gen) * 10
    q, scale = quantize_per_row(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 + 1e-6)


def test_int4_packing_is_exact_and_halves_the_bytes(gen):
    q = torch.randint(-8, 8, (24, 64), generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 32)
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ValueError, match="int4: values must lie in"):
        pack_int4(q * 2)


@pytest.mark.parametrize("rows", [3, 50])
def test_the_w4a8_operator_equals_the_integer_sums(gen, rows):
    """Per group an exact integer dot product (int64 here), scaled by the group's weight scale; the
    token's scale at the end."""
    k, n, group = 512, 48, 128
    x_q = torch.randint(-127, 128, (rows, k), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)
    x_scale, w_scale = torch.rand(rows, 1, generator=gen), torch.rand(n, k // group, generator=gen)
    got = w4a8_matmul(x_q, x_scale, pack_int4(w_q), w_scale, torch.float32)
    sums = torch.einsum("mgk,ngk->mng", x_q.long().reshape(rows, -1, group), w_q.long().reshape(n, -1, group))
    want = (sums.double() * w_scale.double()).sum(-1) * x_scale.double()
    # float32 scaling of exact sums: the error is float32's rounding of the largest terms
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_int4_grouped_round_trip_is_within_half_a_step(gen):
    w = torch.randn(16, 256, generator=gen)
    q, scales = quantize_int4_grouped(w, group=64)
    assert int(q.abs().max()) <= 7 and scales.shape == (16, 4)
    back = q.float().reshape(16, 4, 64) * scales[..., None]
    assert torch.all((back.reshape(16, 256) - w).abs() <= scales.repeat_interleave(64, 1) / 2 + 1e-6)


def test_the_rotations_are_orthogonal_and_the_permutation_a_permutation(gen):
    v = spreading_reflection(16, 5)
    h = torch.eye(16, dtype=v.dtype) - 2 * torch.outer(v, v)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=v.dtype), atol=1e-6, rtol=0)
    uniform = torch.full((16,), 0.25, dtype=v.dtype)
    torch.testing.assert_close(h[5], uniform, atol=1e-6, rtol=0)  # channel 5 spread evenly
    smoothing = fit_smoothing(activations(gen, 64, 256, outliers=4), torch.randn(32, 256), block=32)
    # The outliers' blocks gain from the first rotation; after it and the zigzag, the second may find no
    # reflection that lowers a block's peak (3 in 300 seeds), and is then the identity.
    assert smoothing.rotate1.abs().sum() > 0
    for reflections in (smoothing.rotate1, smoothing.rotate2):
        rotations = as_matrices(reflections)
        eye = torch.eye(32).expand_as(rotations)
        torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye, atol=1e-5, rtol=0)
    assert torch.equal(torch.sort(smoothing.perm).values, torch.arange(256))
    peak = torch.rand(256, generator=gen)
    perm = zigzag_permutation(peak, 32)
    per_block = peak[perm].reshape(8, 32)
    top8 = torch.argsort(peak, descending=True)[:8]
    assert sorted(int(torch.nonzero(perm == c)) // 32 for c in top8) == list(range(8))  # one per block
    assert per_block.sum(1).max() - per_block.sum(1).min() < 0.5 * per_block.sum(1).mean()


def test_the_transform_changes_nothing_before_quantisation(gen):
    x, w = activations(gen, 40, 128, outliers=3), torch.randn(48, 128, generator=gen)
    smoothing = fit_smoothing(x, w, block=32)
    torch.testing.assert_close(smoothing.apply(x) @ smoothing.fold(w).T, x @ w.T, rtol=1e-4, atol=1e-3)
    # and it does its job: the largest magnitude falls
    assert smoothing.apply(x).abs().max() < 0.6 * x.abs().max()


def test_int8_gemm_against_float32(gen):
    x, w = torch.randn(50, 256, generator=gen), torch.randn(96, 256, generator=gen) / 16
    got = Int8Linear(w)(x)
    assert relative_error(got, x @ w.T) < 0.02
    assert Int8Linear(w).weight_bytes() < 0.27 * w.numel() * 4  # a quarter of float32, plus scales


@pytest.mark.parametrize("rows", [1, 50])
@pytest.mark.parametrize("smoothed", [False, True])
def test_w4a8_gemm_against_float32_and_its_reference(gen, rows, smoothed):
    x, w = torch.randn(rows, 256, generator=gen), torch.randn(96, 256, generator=gen) / 16
    smoothing = fit_smoothing(activations(gen, 64, 256, outliers=3), w) if smoothed else None
    got = W4A8Linear(w, smoothing, group=64)(x)
    assert relative_error(got, x @ w.T) < 0.2
    # the quantised product: dequantised (smoothed) weights times dequantised (smoothed) activations
    q, scales = quantize_int4_grouped(smoothing.fold(w) if smoothed else w, 64)
    w_hat = (q.float().reshape(96, 4, 64) * scales[..., None]).reshape(96, 256)
    xq, xs = quantize_per_row(smoothing.apply(x) if smoothed else x)
    torch.testing.assert_close(got, (xq.float() * xs) @ w_hat.T, rtol=1e-4, atol=1e-4)


def test_w4a8_in_bf16_matches_its_float32_self(gen):
    """bf16 weights and inputs (a GPU's): the smoothing stays float32, so bf16 adds only its rounding."""
    x, w = activations(gen, 50, 256, outliers=3), torch.randn(96, 256, generator=gen) / 16
    layer = W4A8Linear(w.to(torch.bfloat16), fit_smoothing(x, w))
    assert layer.weight_scales.dtype == torch.float32 and layer.rotate1.dtype == torch.float32
    got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    want = W4A8Linear(w.to(torch.bfloat16).float(), fit_smoothing(x, w))(x)
    assert relative_error(got.float(), want) < 0.02


def test_duquant_smoothing_lowers_the_error_where_activations_have_outliers(gen):
    """Outlier channels meeting small weights (as in trained transformers, where the output is not
    dominated by them): per token, the outliers set the 8-bit step and the other channels lose it."""
    k = 512
    calibration = activations(gen, 256, k, outliers=6)
    outliers = torch.topk(calibration.abs().amax(0), 6).indices
    x = activations(gen, 64, k)
    x[:, outliers] *= 40.0  # the same outlier channels
    w = torch.randn(128, k, generator=gen) / k**0.5
    w[:, outliers] /= 40.0
    want = x @ w.T
    plain = relative_error(W4A8Linear(w, group=64)(x), want)
    smoothed = relative_error(W4A8Linear(w, fit_smoothing(calibration, w), group=64)(x), want)
    assert smoothed < 0.6 * plain, (smoothed, plain)


def test_w4a8_reads_fewer_weight_bytes_than_bf16(gen):
    """The action expert's q/k/v GEMM of pi0.5 (1024 -> 2560) with bf16 weights."""
    w = torch.randn(2560, 1024, generator=gen).to(torch.bfloat16)
    smoothed = W4A8Linear(w, fit_smoothing(torch.randn(64, 1024, generator=gen), w), group=128)
    bf16_bytes = w.numel() * w.element_size()
    print(f"bf16 {bf16_bytes} bytes, w4a8 {smoothed.weight_bytes()} bytes")
    assert smoothed.weight_bytes() * 3.5 < bf16_bytes
    x = torch.randn(50, 1024, generator=gen).to(torch.bfloat16)
    assert relative_error(smoothed(x).float(), x.float() @ w.float().T) < 0.2


@pytest.mark.parametrize(
    ("rows", "cols", "runs"), [(50, 1024, 16), (50, 2560, 4), (5, 1000, 7), (700, 8192, 4)]
)
def test_the_w4a8_launch_covers_every_run_once_and_leaves_no_split_empty(rows, cols, runs):
    shape = launch_shape(rows, cols, runs, sms=132)
    per_split = [  # the kernel's loop bounds
        list(range(s * shape.runs_per_split, min((s + 1) * shape.runs_per_split, runs)))
        for s in range(shape.splits)
    ]
    assert all(per_split)  # no split without work
    assert sorted(r for split in per_split for r in split) == list(range(runs))  # each run once
    tiles = -(-rows // shape.block_m) * -(-cols // shape.block_n)
    assert shape.splits == 1 or tiles * shape.splits <= 132  # split only up to the GPU's size
