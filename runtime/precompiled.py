"""Compiled stage functions kept whole on disk, so that a warm start loads them (issue 16, item 3).

Inductor's cache (runtime/compile_cache.py) keeps the kernels, but every start still runs Dynamo's
tracing of each compiled function for each input shape and then looks its graphs up: 11.6 s (layer
scope) to 16.7 s (stage scope) of a warm pi05 start on the H200. `torch.compile(fn).aot_compile(...)`
(torch 2.11, experimental) traces and compiles once and saves the result as one file; loading it skips
both (a tiny pi05 vision stage on the CPU: 4.3 s warm through torch.compile, 0.06 s loaded).

An artifact serves the inputs it was compiled for, so a `PrecompiledFunction` keeps one per input
signature (`signature`), each in a file named after the function and that signature, inside the compile
cache's directory for the configuration (whose key already covers the code, torch, the GPU, the model's
shapes and the precision). Weights are read from the modules at every call, never baked in. The
artifact's own guards (shapes, the modules' settings, the global state) are checked at every call. At a
signature's first call in a process, an artifact they refuse is compiled again and saved over; at a
later call, the call goes to torch.compile's tracing instead, as does one with an argument the signature
cannot describe. A signature that cannot be compiled ahead of time (a graph break) is traced, and a
marker file (`*.traced`) spares later starts the attempt; deleting it makes the next start try again.
The files are Python pickles, as Inductor's own cache files are: the cache directory must be trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ARTIFACT_SUFFIX = ".aot"
TRACED_MARKER_SUFFIX = ".traced"  # left where a signature could not be compiled ahead of time


class Unkeyable(TypeError):
    """An argument a signature cannot describe (its compiled code could not be told apart)."""


def _module_signature(module: torch.nn.Module, known: weakref.WeakKeyDictionary) -> tuple:
    """A module's class and its parameters' and buffers' names, shapes, dtypes and devices (made once per
    module: the compiled code reads the tensors themselves at every call, and its guards check the
    module's other settings)."""
    signature = known.get(module)
    if signature is None:
        tensors = itertools.chain(module.named_parameters(), module.named_buffers())
        signature = (
            type(module).__qualname__,
            tuple((name, tuple(t.shape), str(t.dtype), str(t.device)) for name, t in tensors),
        )
        known[module] = signature
    return signature


def _code_digest(code) -> str:
    """A digest of a function's bytecode, constants and the names it reads."""
    return hashlib.sha256(repr((code.co_code, code.co_consts, code.co_names)).encode()).hexdigest()[:16]


def _describe(value, known: weakref.WeakKeyDictionary):
    """What a compiled function specialises on in one argument. Raises `Unkeyable` for a kind of value
    not described here (its artifact could serve another value of the same type wrongly)."""
    if isinstance(value, torch.Tensor):
        return (
            tuple(value.shape),
            value.stride(),
            str(value.dtype),
            str(value.device),
            value.requires_grad,
            value.is_inference(),
        )
    if isinstance(value, torch.nn.Module):
        return _module_signature(value, known)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(item, known) for item in value))
    if isinstance(value, dict):
        return ("dict", tuple((key, _describe(item, known)) for key, item in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    # Code is baked into the artifact, not checked by it: a function is told apart by its code, a
    # closure's cells and its defaults.
    if isinstance(value, functools.partial):
        return (
            "partial",
            _describe(value.func, known),
            _describe(value.args, known),
            _describe(value.keywords, known),
        )
    if inspect.ismethod(value):
        return ("method", _describe(value.__self__, known), _describe(value.__func__, known))
    if inspect.isfunction(value):
        cells = tuple(cell.cell_contents for cell in value.__closure__ or ())
        return (
            "function",
            value.__module__,
            value.__qualname__,
            _code_digest(value.__code__),
            _describe(cells, known),
            _describe(value.__defaults__ or (), known),
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _describe(getattr(value, f.name), known)) for f in dataclasses.fields(value))
        return (type(value).__qualname__, fields)
    raise Unkeyable(f"an argument of type {type(value).__qualname__}")


def _global_state() -> tuple:
    """The process settings compiled code depends on (the artifact's guards check them too)."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.get_num_threads(),
        str(torch.get_default_dtype()),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
    )


def signature(args: tuple, kwargs: dict, known: weakref.WeakKeyDictionary) -> str:
    """A digest of everything an artifact is specialised on: the arguments (`_describe`) and the global
    state it runs under."""
    described = (_describe(args, known), _describe(kwargs, known), _global_state())
    return hashlib.sha256(repr(described).encode()).hexdigest()[:20]


def aot_compile_available() -> bool:
    """torch.compile's ahead-of-time compilation is there (torch >= 2.11; off by default in 2.11)."""
    return hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(
        torch.compiler, "load_compiled_function"
    )


def compile_ahead_of_time(fn: Callable, args: tuple, kwargs: dict, options: dict | None = None):
    """`fn` traced and compiled (with Inductor's `options`) for these arguments now, as a function that can
    be saved."""
    with torch._dynamo.config.patch(enable_aot_compile=True):  # 2.11 adds `aot_compile` only with it on
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=options)
    return compiled.aot_compile((args, kwargs))


class PrecompiledFunction:
    """`fn` compiled per input signature: loaded from `directory` when an earlier run left the artifact
    there, else compiled ahead of time and saved there. `fallback` (torch.compile'd `fn`) serves what
    cannot be compiled ahead of time or what an artifact's guards refuse. Thread-safe: the profiles of
    one executor share it, across its threads."""

    def __init__(
        self, fn: Callable, name: str, directory: Path, fallback: Callable, options: dict | None = None
    ):
        # A bound method is compiled as its function; its instance becomes the first argument.
        self._bound_to = fn.__self__ if inspect.ismethod(fn) else None
        self._fn = fn.__func__ if inspect.ismethod(fn) else fn
        self.name = name
        self.directory = directory
        self._fallback = fallback
        self._options = options  # Inductor's, as the fallback has them
        self._entries: dict[str, Callable] = {}
        self._module_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._fallback_reasons: set[str] = set()  # why calls went to the fallback, each counted once
        self.counts: Counter = Counter()  # loaded, compiled: per signature; fallback: per signature or reason

    def __call__(self, *args, **kwargs):
        if self._bound_to is not None:
            args = (self._bound_to, *args)
        try:
            key = signature(args, kwargs, self._module_signatures)
        except Unkeyable as err:
            return self._call_fallback(args, kwargs, f"not compiled ahead of time ({err})")
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:  # a new signature: loaded or compiled once
                entry = self._entries.get(key) or self._entry(key, args, kwargs)
                self._entries[key] = entry
        if entry is self._fallback:
            return self._call_fallback(args, kwargs)
        # The artifact's guards, checked here (not inside it) so that a refusal is traced, not raised.
        if not entry.guard_check(*args, **kwargs):
            return self._call_fallback(args, kwargs, f"its compiled function's guards refused a call ({key})")
        return entry(*args, **kwargs)

    def path(self, key: str, suffix: str = ARTIFACT_SUFFIX) -> Path:
        return self.directory / f"{self.name}-{key}{suffix}"

    def _call_fallback(self, args: tuple, kwargs: dict, why: str | None = None):
        """The call through torch.compile's tracing; `why` is logged and counted once."""
        if why is not None and why not in self._fallback_reasons:
            with self._lock:
                if why not in self._fallback_reasons:
                    self._fallback_reasons.add(why)
                    self.counts["fallback"] += 1
                    log.warning("%s: %s; torch.compile traces it", self.name, why)
        if self._bound_to is not None:
            args = args[1:]  # the fallback is the compiled bound method
        return self._fallback(*args, **kwargs)

    def _entry(self, key: str, args: tuple, kwargs: dict) -> Callable:
        """The function for one signature: the artifact an earlier run left when it accepts these inputs,
        else one compiled now (and saved), else the fallback (remembered on disk, so later starts do not
        try again)."""
        marker = self.path(key, TRACED_MARKER_SUFFIX)
        if marker.exists():
            log.warning(
                "%s: traced, as %s says (delete it to try compiling ahead of time again)", self.name, marker
            )
            self.counts["fallback"] += 1
            return self._fallback
        path = self.path(key)
        if path.exists():
            try:
                with path.open("rb") as artifact:
                    loaded = torch.compiler.load_compiled_function(artifact)
                loaded.disable_guard_check()  # checked by __call__
            except Exception as err:  # damaged, or from another build: compiled over below
                log.warning("%s: cannot load %s (%s); compiling it again", self.name, path, err)
            else:
                if loaded.guard_check(*args, **kwargs):
                    self.counts["loaded"] += 1
                    return loaded
                log.warning(
                    "%s: %s does not accept these inputs (its guards); compiling it again", self.name, path
                )
        try:
            compiled = compile_ahead_of_time(self._fn, args, kwargs, self._options)
            compiled.disable_guard_check()
        except torch.OutOfMemoryError:  # the device's state, not the function's: no marker, no fallback
            raise
        except Exception as err:  # a graph break, or an argument the serialiser does not take
            log.warning(
                "%s: not compiled ahead of time (%s); torch.compile traces it at every start", self.name, err
            )
            self.counts["fallback"] += 1
            reason = f"{err}\n"
            self._write(marker, lambda partial: partial.write_text(reason))
            return self._fallback
        self.counts["compiled"] += 1
        self._write(path, lambda partial: compiled.save_compiled_function(str(partial)))
        return compiled

    def _write(self, path: Path, write: Callable[[Path], object]) -> None:
        """Write to a temporary name and rename: a process starting beside this one (one per GPU) never
        reads half a file. A failure is logged; serving goes on and the next start compiles again."""
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write(partial)
            os.replace(partial, path)
        except Exception as err:
            log.warning("%s: cannot save %s (%s)", self.name, path, err)
            partial.unlink(missing_ok=True)
