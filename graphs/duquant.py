"""DuQuant-style smoothing of a GEMM's input before 8-bit activations and 4-bit weights (Lin et al.,
"DuQuant: Distributing Outliers via Dual Transformation", 2024; ../shared/background's optimisation log).

A few input channels of a transformer GEMM carry values far larger than the rest; quantised per token
they take the whole 8-bit range and the other channels round to a handful of levels. An orthogonal
transform T of the input channels changes nothing exactly, x W^T = (x T)(W T)^T, and can spread those
outliers over many channels first. DuQuant's T, computed once from calibration activations:

    rotate1   block-diagonal rotations (blocks of `block` channels): in each block, greedily, the
              channel with the largest magnitude is mapped onto the block's uniform direction by a
              Householder reflection, which spreads it over the whole block
    permute   a zigzag permutation: channels sorted by magnitude are dealt to the blocks back and forth,
              so each block gets a fair share of the large ones
    rotate2   block rotations again, now on blocks of balanced content

Before them, as in DuQuant (after SmoothQuant), each channel is divided by a smoothing scale
s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) and its weights multiplied by it, which moves part of an
activation outlier's range into the weights: x W^T = (x / s) (W s)^T. So the input becomes (x / s) T and
the weight (W s) T.

The weights are transformed once at load (then quantised); the input's transform runs per call: a scale,
the cached reflections of each block (a few dot products per block) and a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK = 64  # channels per rotation block: larger blocks spread an outlier further
DEFAULT_GREEDY_STEPS = 4
DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength


def spreading_reflection(size: int, channel: int) -> torch.Tensor:
    """The unit vector v [size] of the Householder reflection H = I - 2 v v^T (orthogonal, symmetric)
    whose row `channel` is the uniform unit vector: x @ H sends channel `channel` of x evenly over all
    `size` channels. Zero (no reflection) for a block of one channel."""
    v = -torch.full((size,), size**-0.5, dtype=torch.float64)
    v[channel] += 1.0
    norm = v.norm()
    return v / norm if norm > 1e-12 else torch.zeros(size, dtype=torch.float64)


def reflect(x: torch.Tensor, reflections: torch.Tensor) -> torch.Tensor:
    """x [M, blocks, b] through each block's reflections [blocks, steps, b] in turn (a zero vector is
    no reflection): x <- x - 2 (x . v) v. Stored this way a block's rotation is steps * b numbers, not
    b * b: the rotations add little to the bytes a 4-bit GEMM reads."""
    for step in range(reflections.shape[1]):
        v = reflections[:, step]  # [blocks, b]
        x = x - 2.0 * (x * v).sum(dim=-1, keepdim=True) * v
    return x


def as_matrices(reflections: torch.Tensor) -> torch.Tensor:
    """The rotations [blocks, b, b] that `reflections` [blocks, steps, b] apply (x @ R), for checking."""
    blocks, _, b = reflections.shape
    eye = torch.eye(b, dtype=reflections.dtype).expand(blocks, b, b)
    return reflect(eye.transpose(0, 1), reflections).transpose(0, 1)


def greedy_block_rotations(samples: torch.Tensor, block: int, steps: int) -> torch.Tensor:
    """samples [n, K] -> reflections [K / block, steps, block]: per block, up to `steps` reflections, each
    kept only if it lowers the block's largest magnitude over the samples (the rest zero)."""
    n, k = samples.shape
    blocks = samples.double().reshape(n, k // block, block).transpose(0, 1)  # [blocks, n, block]
    reflections = torch.zeros(k // block, steps, block, dtype=torch.float64)
    for b in range(k // block):
        x = blocks[b]
        for step in range(steps):
            peak = x.abs().amax(dim=0)  # per channel
            v = spreading_reflection(block, int(peak.argmax()))
            reflected = x - 2.0 * (x @ v)[:, None] * v
            if reflected.abs().max() >= peak.max():
                break
            x, reflections[b, step] = reflected, v
    return reflections.float()


def zigzag_permutation(channel_peak: torch.Tensor, block: int) -> torch.Tensor:
    """channel_peak [K] -> perm [K]: x[:, perm] puts into block j the channels a zigzag deal of the
    channels, largest first, gives to j (0, 1, ..., B-1, B-1, ..., 0, 0, 1, ...)."""
    k = channel_peak.numel()
    count = k // block
    order = torch.argsort(channel_peak, descending=True)
    lanes: list[list[int]] = [[] for _ in range(count)]
    for i, channel in enumerate(order.tolist()):
        lap, position = divmod(i, count)
        lanes[position if lap % 2 == 0 else count - 1 - position].append(channel)
    return torch.tensor([c for lane in lanes for c in lane], dtype=torch.long)


@dataclass
class Smoothing:
    """A GEMM's input transform: divide by `scale`, then T = rotate1, permute, rotate2 (K channels), each
    rotation as its blocks' Householder reflections."""

    scale: torch.Tensor  # [K]
    rotate1: torch.Tensor  # [K / block, steps, block] reflection vectors
    perm: torch.Tensor  # [K]
    rotate2: torch.Tensor  # [K / block, steps, block]

    @property
    def block(self) -> int:
        return self.rotate1.shape[-1]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x T [M, K] (in x's dtype, computed in the rotations' dtype)."""
        m, k = x.shape
        y = reflect(x.to(self.rotate1.dtype).reshape(m, -1, self.block), self.rotate1).reshape(m, k)
        y = reflect(y[:, self.perm].reshape(m, -1, self.block), self.rotate2)
        return y.reshape(m, k).to(x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM's input [M, K]: (x / s) T."""
        return self.rotate(x / self.scale.to(x.dtype))

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """The GEMM's weight [N, K]: (W s) T, so that apply(x) fold(W)^T = x W^T."""
        return self.rotate(weight * self.scale.to(weight.dtype))

    def to(self, device, dtype: torch.dtype = torch.float32) -> Smoothing:
        """On `device`, scale and rotations in `dtype` (the permutation stays integer)."""
        return Smoothing(
            self.scale.to(device, dtype), self.rotate1.to(device, dtype), self.perm.to(device),
            self.rotate2.to(device, dtype),
        )  # fmt: skip


def fit_smoothing(
    samples: torch.Tensor,
    weight: torch.Tensor,
    block: int = DEFAULT_BLOCK,
    steps: int = DEFAULT_GREEDY_STEPS,
    alpha: float = DEFAULT_ALPHA,
) -> Smoothing:
    """DuQuant's transform for a GEMM of `weight` [N, K] whose inputs look like `samples` [n, K]."""
    n, k = samples.shape
    block = min(block, k)
    if k % block:
        raise ValueError(f"duquant: {k} input channels are not a multiple of the block {block}")
    samples = samples.float().cpu()
    x_peak = samples.abs().amax(dim=0).clamp(min=1e-5)
    w_peak = weight.detach().float().cpu().abs().amax(dim=0).clamp(min=1e-5)
    scale = (x_peak**alpha / w_peak ** (1.0 - alpha)).clamp(min=1e-5)
    samples = samples / scale
    rotate1 = greedy_block_rotations(samples, block, steps)
    none = torch.zeros_like(rotate1)
    rotated = Smoothing(torch.ones(k), rotate1, torch.arange(k), none).rotate(samples)
    perm = zigzag_permutation(rotated.abs().amax(dim=0), block)
    rotate2 = greedy_block_rotations(rotated[:, perm], block, steps)
    return Smoothing(scale, rotate1, perm, rotate2)
