"""Compiled kernels kept on disk between runs (issue 16, item 3).

torch.compile's stages are compiled by Inductor, which caches what it made (FX graphs, AOTAutograd
graphs, Triton kernels, autotuning results) in TORCHINDUCTOR_CACHE_DIR, by default under /tmp, which a
robot's reboot empties. Here the cache goes to `compile_cache` (default ~/.cache/vla_runtime/compile;
"none": Inductor's default), in a directory per key, so a restart reuses what an earlier run compiled,
and a change of this package's code, torch, Triton, CUDA, the GPU, the model's shapes or the precision
settings starts a directory of its own instead of meeting another's artifacts. (Inductor also keys
each artifact by its graph and versions; the directory per key keeps runs apart and lets an old one be
deleted whole.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .calibration import model_shape_digest
from .config import RuntimeConfig

PACKAGE = Path(__file__).resolve().parent.parent
TRACED_SOURCES = ("graphs", "runtime")  # the code torch.compile traces lives here
# What the FP8 scales calibrated on synthetic frames depend on besides the weights, shapes and code: the
# inputs' preparation (statistics, prompt, state, cameras), the vision tower's precision, the calibration.
SYNTHETIC_SCALES_FIELDS = (
    "robot", "state_in_prompt", "tokenizer", "state_dim", "optional_camera_names", "max_token_len",
    "vision_precision", "fp8_expert", "denoising_steps", "fp8_calibration_frames", "fp8_calibration_margin",
    "seed",
)  # fmt: skip
PRECISION_FIELDS = ("precision", "vision_precision", "fp8_expert", "quantised_stages", "handover")


@dataclass(frozen=True)
class CompileCache:
    path: Path
    warm: bool  # it held artifacts before this run

    def describe(self) -> str:
        return f"compile cache {'warm' if self.warm else 'cold'}: {self.path}"


def source_digest() -> str:
    """A digest of the package's traced sources (every .py under graphs/ and runtime/)."""
    digest = hashlib.sha256()
    for folder in TRACED_SOURCES:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            digest.update(str(path.relative_to(PACKAGE)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(config: RuntimeConfig) -> str:
    device = torch.device(config.device)
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    try:
        import triton  # noqa: PLC0415 - only with torch's CUDA wheels

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    identity = {
        "code": source_digest(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "model": model_shape_digest(config.model),
        "stages": list(config.use_compile),
        "scope": config.compile_scope,
        # Kept whole or traced: their Inductor entries are keyed apart (the ahead-of-time compile bundles
        # its own), so a start of the one finds nothing of the other's and must count as cold.
        "precompile": config.precompile,
        **{name: getattr(config, name) for name in PRECISION_FIELDS},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root(config: RuntimeConfig) -> Path | None:
    """`compile_cache` as a directory, or None when it is "none"."""
    if config.compile_cache.strip().lower() in ("", "none"):
        return None
    return Path(config.compile_cache).expanduser()


def synthetic_fp8_scales_path(config: RuntimeConfig, weights_id: str) -> Path | None:
    """Where FP8 activation scales calibrated on synthetic frames are kept between starts (None with
    `compile_cache: none`): a file per everything the synthetic frames' activations depend on (the
    weights, the model's shape, the settings that shape the inputs, the vision precision, the expert's
    inclusion and steps, the frames, margin and seed, and the code that makes them). Loading checks the
    identity the file records as well (runtime/calibration.load_scales)."""
    root = cache_root(config)
    if root is None:
        return None
    identity = {
        "code": source_digest(),
        "weights": weights_id,
        "model": model_shape_digest(config.model),
        **{name: getattr(config, name) for name in SYNTHETIC_SCALES_FIELDS},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return root / "fp8_scales" / f"{digest}.safetensors"


def use_compile_cache(config: RuntimeConfig) -> CompileCache | None:
    """Point Inductor at this configuration's cache directory (before anything compiles); None where
    nothing is compiled or `compile_cache` is "none" (Inductor's own default then)."""
    root = cache_root(config)
    if not config.use_compile or root is None:
        return None
    path = root / cache_key(config)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"compile_cache: cannot create {path}: {err.strerror or err}") from None
    warm = any(path.iterdir())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    if warm:
        # Kernels are loaded, not compiled: no pool of compile workers (each a process importing torch,
        # started at the first load and contending for the CPUs; measured on the H200: a warm layer-scope
        # start 18.1 s to ready with them, 12.2 s without). What a warm cache lacks compiles in-process.
        import torch._inductor.config as inductor_config  # noqa: PLC0415 - only where something compiles

        inductor_config.compile_threads = 1
    return CompileCache(path, warm)
