"""Whether Python keeps its own compiled code between starts (issue 16, item 3).

Where an install cannot keep it (PYTHONDONTWRITEBYTECODE, as many container images set, or a read-only
environment without the bytecode compiled in), every start compiles the source of every module it
imports: 6.5-8.4 s of a profiled warm pi05 start on the H200 machine, whose environment is so
(benchmarks/results/2026-11-30-h200-warm-start-profile-d855152.json). The ready line says so.
"""

from __future__ import annotations

import os

BYTECODE_HINT = (
    "Python's bytecode is not kept here, so every start compiles torch's sources (seconds): set "
    "PYTHONPYCACHEPREFIX to a writable directory"
)


def bytecode_kept(module=None) -> bool:
    """Whether `module` (default: one of torch's compiler modules, imported by every compiled start) was
    loaded from, or left, its cached bytecode (`__cached__` honours PYTHONPYCACHEPREFIX)."""
    if module is None:
        import torch._dynamo.utils as module  # noqa: PLC0415 - imported by now where anything compiles
    cached = getattr(module, "__cached__", None)
    return cached is None or os.path.exists(cached)
