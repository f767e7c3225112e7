"""FP8 (e4m3) GEMMs for the Gemma prefix on Hopper, through `torch._scaled_mm`.

Per-tensor scales on both sides: each weight is quantised once, at load (`quantize_prefix`), and kept as
a buffer; each activation scale is calibrated once on a handful of frames (`calibrate_prefix`: the largest
magnitude seen, over e4m3's largest finite value 448) and saved with the model. Nothing is computed per
frame but the cast of the activations. Norms, RoPE, softmax and attention stay in bf16 / float32.

Which GEMMs: the fused q/k/v projection, the output projection, the fused gate/up projection and the
down projection of every prefix layer, i.e. all the prefix's weight GEMMs; optionally
(`RuntimeConfig.fp8_expert`) the same four GEMMs of every action-expert layer, whose 50-row GEMMs are
bound by reading their weights, which FP8 halves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import fp8_geglu
from .gemma import GemmaStack

E4M3_MAX = 448.0
FP8_GEMMS = ("qkv", "o", "gate_up", "down")
# Activation row counts the action expert's GEMMs read padded (with zero rows, their outputs dropped), by
# GEMM: rows -> padded rows. At pi05's 50 rows, cuBLAS picks faster kernels for 64 in the two GEMMs whose K
# is the larger side (output projection 2048 -> 1024, down projection 4096 -> 1024). H200, weights from
# DRAM (`benchmarks/expert_gemm_layouts.py --padding-rows 10,50,200,400`, fefeae6): output 5.25 -> 4.83 us,
# down 7.44 -> 6.33; padded to the next multiple of 64 the other row counts measured were slower (10: +0.2
# us each; 200 and 400: +0.1 to +0.3), and so was q/k/v at 50 (+0.07). In place, the denoise loop 7.60 ->
# 7.34 ms (docs/performance.md).
EXPERT_ROW_PADDING = {"o": {50: 64}, "down": {50: 64}}


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "FP8 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, f"FP8 GEMMs need compute capability 8.9+ (Ada, Hopper); {name} is {major}.{minor}"
    return True, ""


class FP8Linear(nn.Module):
    """y = x W^T with x and W in float8 e4m3 and per-tensor scales; output in bf16."""

    def __init__(self, weight: torch.Tensor, row_padding: dict[int, int] | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # activation rows -> the rows this GEMM reads, zero rows after them (EXPERT_ROW_PADDING)
        self.row_padding = row_padding or {}
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"fp8: GEMM dims must be multiples of 16, got {tuple(weight.shape)}")
        w = weight.detach().float()
        scale = (w.abs().amax() / E4M3_MAX).clamp(min=1e-12)
        # [K, N] column-major: the transpose of the row-major [N, K] quantised weight, as _scaled_mm wants.
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn).t(), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(()), persistent=False)
        self.register_buffer("input_scale", torch.ones((), device=weight.device), persistent=False)
        self.calibrating = False  # observe the inputs' largest magnitude
        self.counting_clamped = False  # count the inputs the fixed scale would clamp
        self.observed_amax = torch.zeros((), device=weight.device)
        self.clamped = self.counted = 0

    @property
    def observing(self) -> bool:
        """Inputs are observed (and the GEMM runs in high precision) rather than served in FP8."""
        return self.calibrating or self.counting_clamped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.observing:
            # Observe the input, and answer with the (dequantised) weight in high precision, so that what
            # later layers see while calibrating is not distorted by activation scales not yet fixed.
            magnitude = flat.detach().abs().float()
            if self.calibrating:
                self.observed_amax = torch.maximum(self.observed_amax, magnitude.amax())
            else:
                self.clamped += int((magnitude > self.input_scale * E4M3_MAX).sum())
                self.counted += magnitude.numel()
            y = flat.float() @ (self.weight_fp8.float() * self.weight_scale)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # the stack's compute dtype
        return self.matmul(self.quantize(flat), x.shape[:-1])

    def padded_rows(self, rows: int) -> int:
        return self.row_padding.get(rows, rows)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [padded rows, K] float8 e4m3 with this GEMM's calibrated input scale (the padding
        rows are zeros)."""
        flat = x.reshape(-1, self.in_features)
        if self.padded_rows(flat.shape[0]) > flat.shape[0]:
            flat = F.pad(flat, (0, 0, 0, self.padded_rows(flat.shape[0]) - flat.shape[0]))
        return (flat.float() / self.input_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def matmul(self, x_fp8: torch.Tensor, leading_shape) -> torch.Tensor:
        """An already quantised input [padded rows, K] -> [*leading_shape, N] in bf16 (the padding rows'
        outputs dropped)."""
        y = torch._scaled_mm(
            x_fp8,
            self.weight_fp8,
            scale_a=self.input_scale,
            scale_b=self.weight_scale,
            out_dtype=torch.bfloat16,
        )
        return y[: math.prod(leading_shape)].reshape(*leading_shape, self.out_features)


def quantize_prefix(stack: GemmaStack) -> int:
    """The prefix LM: its last layer computes only its keys and values (PI0Model.fill_prefix)."""
    return quantize_stack(stack, last_layer_kv_only=True)


def quantize_stack(
    stack: GemmaStack, last_layer_kv_only: bool = False, row_padding: dict[str, dict[int, int]] | None = None
) -> int:
    """Attach FP8 copies of a Gemma stack's GEMM weights (the bf16 weights stay, for the reference path),
    with `row_padding` by GEMM name (FP8_GEMMS; e.g. EXPERT_ROW_PADDING). Returns the number of quantised
    GEMMs."""
    count = stack.quantize(FP8Linear, last_layer_kv_only)
    set_row_padding(stack, row_padding or {})
    for layer in stack.layers:
        # One Triton kernel for gate/up + GeGLU + the cast, where it can run (graphs/fp8_geglu.py).
        if layer.mlp.gate_up_quant is not None:
            layer.mlp.fused_geglu = fp8_geglu.available(layer.mlp.gate_up_weight.device)[0]
    return count


def set_row_padding(stack: GemmaStack, row_padding: dict[str, dict[int, int]]) -> None:
    """Each FP8 GEMM's row padding by its name in FP8_GEMMS (none for those not named)."""
    unknown = set(row_padding) - set(FP8_GEMMS)
    if unknown:
        raise ValueError(f"fp8: no GEMM named {', '.join(sorted(unknown))}; known: {', '.join(FP8_GEMMS)}")
    for name, padding in row_padding.items():
        if any(padded < rows for rows, padded in padding.items()):
            raise ValueError(f"fp8: {name}'s row padding {padding} has fewer rows padded than computed")
    for name, module in fp8_modules(stack).items():
        module.row_padding = dict(row_padding.get(name.rsplit(".", 1)[1], {}))


def fp8_modules(stack: GemmaStack, prefix: str = "") -> dict[str, FP8Linear]:
    """Every FP8 GEMM of a stack by name (`prefix` + layers.<i>.<gemm>): the calibration file's keys."""
    out = {}
    for i, layer in enumerate(stack.layers):
        for name, module in (
            ("qkv", layer.self_attn.qkv_quant),
            ("o", layer.self_attn.o_quant),
            ("gate_up", layer.mlp.gate_up_quant),
            ("down", layer.mlp.down_quant),
        ):
            if module is not None:
                out[f"{prefix}layers.{i}.{name}"] = module
    return out


def _modules(stack_or_modules) -> dict[str, FP8Linear]:
    return fp8_modules(stack_or_modules) if isinstance(stack_or_modules, GemmaStack) else stack_or_modules


def calibrate_prefix(stack: GemmaStack, run_frames, margin: float = 1.0) -> dict[str, float]:
    return calibrate(fp8_modules(stack), run_frames, margin)


@torch.no_grad()
def clamped_fraction(modules: dict[str, FP8Linear], run_frames) -> float:
    """Run `run_frames()` with the scales fixed and count the GEMM inputs they would clamp (|x| over
    scale * 448), over all FP8 GEMMs: how much headroom the scales leave on frames they were not made from."""
    for m in modules.values():
        m.counting_clamped, m.clamped, m.counted = True, 0, 0
    try:
        run_frames()
    finally:
        for m in modules.values():
            m.counting_clamped = False
    counted = sum(m.counted for m in modules.values())
    return sum(m.clamped for m in modules.values()) / counted if counted else 0.0


@torch.no_grad()
def calibrate(modules: dict[str, FP8Linear], run_frames, margin: float = 1.0) -> dict[str, float]:
    """Run `run_frames()` (the stages over a handful of frames) with every FP8 GEMM observing its input,
    then fix each input scale to amax * margin / 448. For the action expert the amax is taken over every
    denoising step: one scale per GEMM serves the whole loop."""
    for m in modules.values():
        m.calibrating = True
        m.observed_amax = torch.zeros((), device=m.weight_scale.device)
        m.input_scale.fill_(1.0)
    try:
        run_frames()
    finally:
        for m in modules.values():
            m.calibrating = False
    scales = {}
    for name, m in modules.items():
        m.input_scale.copy_((m.observed_amax * margin / E4M3_MAX).clamp(min=1e-12))
        scales[name] = float(m.input_scale)
    return scales


def save_calibration(stack_or_modules, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    tensors = {
        f"{name}.input_scale": m.input_scale.detach().cpu().reshape(1)
        for name, m in _modules(stack_or_modules).items()
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_calibration(stack_or_modules, path: str | Path) -> None:
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - not a safetensors file
        raise ValueError(f"fp8_calibration: cannot read {path}: {err}") from None
    modules = _modules(stack_or_modules)
    missing = sorted(f"{n}.input_scale" for n in modules if f"{n}.input_scale" not in tensors)
    if missing:
        raise ValueError(
            f"fp8 calibration {path}: missing scales {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for name in modules:  # each one finite positive number: a zero or NaN scale would break every GEMM
        scale = tensors[f"{name}.input_scale"]
        if scale.numel() != 1 or not scale.is_floating_point() or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"fp8 calibration {path}: {name}.input_scale must be one finite number")
        if float(scale) <= 0:
            raise ValueError(
                f"fp8 calibration {path}: {name}.input_scale must be positive, got {float(scale)}"
            )
    for name, m in modules.items():
        m.input_scale.copy_(tensors[f"{name}.input_scale"].reshape(()))
