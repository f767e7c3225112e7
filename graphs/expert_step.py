"""A denoising step's action-expert layers in one persistent CUDA kernel (issue 16, item 4).

The unfused FP8 expert runs about twelve kernels per layer and step (norms, four cuBLAS FP8 GEMMs, the
fused GeGLU, RoPE, two attention GEMMs, the softmax, casts), each 2-6 us, and each bound by its fixed
cost rather than by the bytes it reads. `expert_step.cu` runs every layer of a step in one kernel
instead: a block per multiprocessor, phases separated by grid-wide barriers (the list is at the top of
the .cu file). It computes what the unfused path computes, rounding to bf16 where that path writes a
bf16 tensor, so its output differs from it by float32 summation order (tests/gpu/test_expert_step_gpu.py).

Where it runs: pi0.5's adaptive-norm expert with FP8 GEMMs (`fp8_expert`), width 1024, one KV head of
256 dims, batch x suffix rows <= 64 (pi05 at batch 1; LIBERO's horizon 10 up to batch 6), on a GPU of
compute capability 8.9 or above (FP8 `mma.sync`). It is built from source on first use with the CUDA
compiler (`nvcc` on PATH, or under CUDA_HOME) and kept under ~/.cache/vla_runtime/kernels, keyed by the
source, the compiler's version and the GPU architecture. Elsewhere `available` says why not and the
model keeps the unfused path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("expert_step.cu")
# The per-layer table's columns, in the order of `enum Column` in expert_step.cu.
TABLE_GEMMS = ("qkv", "o", "gate_up", "down")
MAX_ROWS = 64
WIDTH = 1024
HEAD_DIM = 256
CHECK_ERRORS = {
    1: f"batch x suffix rows must be 1..{MAX_ROWS}",
    2: f"the expert's width must be {WIDTH}",
    3: "the MLP width and the heads' width must be multiples of 1024",
}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def _nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "the fused expert step needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False, "the fused expert step needs FP8 tensor cores (compute capability 8.9+)"
    if _nvcc() is None:
        return False, "the fused expert step is built on first use and needs nvcc (on PATH or CUDA_HOME)"
    return True, ""


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("VLA_KERNEL_CACHE", "~/.cache/vla_runtime/kernels")).expanduser()


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    # sm_90a: Hopper's full instruction set; the kernel uses mma.sync, which plain targets have too.
    return f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"


def load(device: torch.device | str) -> ctypes.CDLL:
    """Build (once per source, compiler and architecture) and load the kernel's shared library."""
    global _library
    with _lock:
        if _library is not None:
            return _library
        device = torch.device(device)
        ok, why = available(device)
        if not ok:
            raise RuntimeError(why)
        nvcc = _nvcc()
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        arch = _arch(device)
        key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + arch.encode()).hexdigest()[:16]
        target = kernel_cache_dir() / f"expert_step-sm{arch}-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            command = [nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
            command += ["-shared", "-Xcompiler", "-fPIC", str(SOURCE), "-o", str(temporary)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building the fused expert step failed:\n{result.stderr[-2000:]}")
            os.replace(temporary, target)  # another process building beside this one sees all or nothing
        lib = ctypes.CDLL(str(target))
        lib.vla_expert_step_scratch_bytes.restype = ctypes.c_size_t
        lib.vla_expert_step_scratch_bytes.argtypes = [ctypes.c_int] * 6
        lib.vla_expert_step_check.argtypes = [ctypes.c_int] * 5
        lib.vla_expert_step_error.restype = ctypes.c_char_p
        lib.vla_expert_step_error.argtypes = [ctypes.c_int]
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.vla_expert_step.argtypes = (
            [p, i, i, p, p, p, p, p, p, p] + [i] * 7 + [ctypes.c_float, p, p, i, p, i, p]
        )
        lib.vla_expert_barrier_bench.argtypes = [i, i, p, p, i, p]
        _library = lib
        return lib


def layer_table(stack) -> torch.Tensor:
    """The device pointers the kernel reads per layer [depth, 12] int64: each FP8 GEMM's weight ([N, K]
    row-major e4m3), then per GEMM its input scale and weight scale. The tensors stay the stack's
    buffers (the scales are updated in place by calibration), so the table stays valid."""
    rows = []
    for layer in stack.layers:
        gemms = [
            layer.self_attn.qkv_quant,
            layer.self_attn.o_quant,
            layer.mlp.gate_up_quant,
            layer.mlp.down_quant,
        ]
        if any(g is None or not hasattr(g, "weight_fp8") for g in gemms):
            raise ValueError("the fused expert step needs the expert's FP8 GEMMs (fp8_expert)")
        weights = [g.weight_fp8.t() for g in gemms]  # weight_fp8 is the [K, N] view of an [N, K] matrix
        if any(not w.is_contiguous() for w in weights):
            raise ValueError("the fused expert step needs row-major [N, K] FP8 weights")
        row = [w.data_ptr() for w in weights]
        for g in gemms:
            row += [g.input_scale.data_ptr(), g.weight_scale.data_ptr()]
        rows.append(row)
    device = stack.layers[0].self_attn.qkv_quant.weight_fp8.device
    return torch.tensor(rows, dtype=torch.int64, device=device)


@torch.library.custom_op("vla_runtime::fp8_expert_step", mutates_args=())
def fp8_expert_step(
    hidden: torch.Tensor,  # [B, S, D] bf16, the suffix embeddings
    mods: torch.Tensor,  # [2 * depth + 1, B, 3D] bf16
    kv_cache: torch.Tensor,  # [depth, 2, B, 1, P, 256] bf16
    bias: torch.Tensor,  # [B, 1, S, keys] bf16, keys >= P + S
    cos: torch.Tensor,  # [B, S, 256] bf16
    sin: torch.Tensor,
    table: torch.Tensor,  # layer_table(stack)
    eps: float,
    mlp_dim: int,
    num_heads: int,
) -> torch.Tensor:
    return _launch(hidden, mods, kv_cache, bias, cos, sin, table, eps, mlp_dim, num_heads)


def _launch(hidden, mods, kv_cache, bias, cos, sin, table, eps, mlp_dim, num_heads, stamps=None):
    lib = load(hidden.device)
    b, s, d = hidden.shape
    depth, p = table.shape[0], kv_cache.shape[-2]
    tensors = [t.contiguous() for t in (hidden, mods, kv_cache, bias, cos, sin)]
    hidden, mods, kv_cache, bias, cos, sin = tensors
    out = torch.empty_like(hidden)
    scratch = torch.empty(
        lib.vla_expert_step_scratch_bytes(b, s, p, d, mlp_dim, num_heads),
        dtype=torch.uint8,
        device=hidden.device,
    )
    barrier = torch.zeros(1, dtype=torch.int32, device=hidden.device)
    stream = torch.cuda.current_stream(hidden.device).cuda_stream
    device_index = hidden.device.index if hidden.device.index is not None else torch.cuda.current_device()
    code = lib.vla_expert_step(
        table.data_ptr(), 0, depth, hidden.data_ptr(), out.data_ptr(), mods.data_ptr(), kv_cache.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), bias.data_ptr(), b, s, p, bias.shape[-1], d, mlp_dim, num_heads,
        float(eps), scratch.data_ptr(), barrier.data_ptr(), device_index, stream, 0,
        None if stamps is None else stamps.data_ptr(),
    )  # fmt: skip
    if code:
        raise RuntimeError(f"fused expert step: {lib.vla_expert_step_error(code).decode()}")
    return out


# The kernel's phases in the order of its barriers (expert_step.cu): the first layer's input norm, then
# per layer these, the last layer's "out" ending the kernel.
LAYER_PHASES = ("qkv", "attend", "merge", "o", "residual+norm", "gate/up+geglu", "down", "out+norm")


@fp8_expert_step.register_fake
def _(hidden, mods, kv_cache, bias, cos, sin, table, eps, mlp_dim, num_heads):
    return torch.empty_like(hidden)


class ExpertStep:
    """The fused step for one FP8 action expert: `model.expert_step = ExpertStep(model)` routes
    PI0Model.velocity through it for the shapes it supports."""

    def __init__(self, model):
        cfg = model.cfg.expert
        ok, why = available(next(model.expert.parameters()).device)
        if not ok:
            raise ValueError(why)
        if not model.cfg.pi05:
            raise ValueError("the fused expert step is written for pi0.5's adaptive norms")
        if cfg.width != WIDTH or cfg.head_dim != HEAD_DIM or cfg.num_kv_heads != 1:
            raise ValueError(
                f"the fused expert step needs width {WIDTH}, head_dim {HEAD_DIM}, one KV head; the expert "
                f"has {cfg.width}, {cfg.head_dim}, {cfg.num_kv_heads}"
            )
        self.cfg = cfg
        self.stack = model.expert
        self.table = layer_table(model.expert)
        load(self.table.device)

    def supports(self, batch: int, suffix: int) -> bool:
        observing = any(
            g.observing
            for layer in self.stack.layers
            for g in (layer.self_attn.qkv_quant, layer.mlp.down_quant)
        )
        return batch * suffix <= MAX_ROWS and not observing and self.stack.layers[0].mlp.quant_enabled

    def __call__(self, hidden, mods, kv_cache, bias, cos, sin) -> torch.Tensor:
        return fp8_expert_step(
            hidden, mods, kv_cache, bias, cos, sin, self.table, self.cfg.rms_norm_eps, self.cfg.mlp_dim,
            self.cfg.num_heads,
        )  # fmt: skip

    def phase_times_us(self, hidden, mods, kv_cache, bias, cos, sin) -> dict[str, list[float]]:
        """One eager call with block 0 timing each phase (%globaltimer, after each grid barrier): per phase
        name, its time in each layer, in microseconds. For benchmarks: it adds a barrier at the end."""
        depth = self.table.shape[0]
        stamps = torch.zeros(2 + len(LAYER_PHASES) * depth, dtype=torch.int64, device=hidden.device)
        _launch(
            hidden, mods, kv_cache, bias, cos, sin, self.table, self.cfg.rms_norm_eps, self.cfg.mlp_dim,
            self.cfg.num_heads, stamps,
        )  # fmt: skip
        t = stamps.cpu().tolist()
        spans = [(t[i + 1] - t[i]) / 1e3 for i in range(len(t) - 1)]
        times = {"norm": [spans[0]]}
        for i, name in enumerate(LAYER_PHASES * depth):
            times.setdefault(name, []).append(spans[1 + i])
        return times


def barrier_us(device, n: int = 1000, fences: bool = False, repeats: int = 7) -> float:
    """The kernel's grid barrier alone: microseconds per barrier, a grid of one block per multiprocessor
    (median of `repeats` launches of `n` barriers, CUDA events). For benchmarks."""
    lib = load(device)
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    times = []
    for _ in range(repeats):
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)
        start.record(stream)
        code = lib.vla_expert_barrier_bench(
            n, int(fences), counter.data_ptr(), None, index, stream.cuda_stream
        )
        end.record(stream)
        end.synchronize()
        if code:
            raise RuntimeError(f"barrier benchmark: {lib.vla_expert_step_error(code).decode()}")
        times.append(start.elapsed_time(end) * 1e3 / (n + 1))
    return sorted(times)[len(times) // 2]
