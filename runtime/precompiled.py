"""Compiled stage functions kept whole on disk, so that a warm start loads them (issue 16, item 3).

Inductor's cache (runtime/compile_cache.py) keeps the kernels, but every start still runs Dynamo's
tracing of each compiled function for each input shape and then looks its graphs up: 11.6 s (layer
scope) to 16.7 s (stage scope) of a warm pi05 start on the H200. `torch.compile(fn).aot_compile(...)`
(torch 2.11, experimental) traces and compiles once and saves the result as one file; loading it skips
both (a tiny pi05 vision stage on the CPU: 4.3 s warm through torch.compile, 0.06 s loaded).

An artifact serves exactly the inputs it was compiled for, so a `PrecompiledFunction` keeps one per
input signature (`signature`), each in a file named after the function and that signature, inside the
compile cache's directory for the configuration (whose key already covers the code, torch, the GPU, the
model's shapes and the precision). Weights are read from the modules at every call, never baked in.
A file that does not load is compiled over; a function that cannot be compiled ahead of time (a graph
break) is compiled by torch.compile as before, with a warning.
"""

from __future__ import annotations

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


def _module_signature(module: torch.nn.Module, known: weakref.WeakKeyDictionary) -> tuple:
    """A module's class and its parameters' and buffers' names, shapes and dtypes (made once per
    module: the compiled code reads the tensors themselves at every call)."""
    signature = known.get(module)
    if signature is None:
        tensors = itertools.chain(module.named_parameters(), module.named_buffers())
        signature = (
            type(module).__qualname__,
            tuple((name, tuple(t.shape), str(t.dtype), str(t.device)) for name, t in tensors),
        )
        known[module] = signature
    return signature


def _describe(value, known: weakref.WeakKeyDictionary):
    """What a compiled function specialises on in one argument."""
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
    # Anything else (a function, a settings object) is specialised on by the traced code itself, which
    # the compile cache's key covers; its type tells different kinds apart.
    return type(value).__qualname__


def signature(args: tuple, kwargs: dict, known: weakref.WeakKeyDictionary) -> str:
    """A digest of everything an artifact is specialised on: the arguments (`_describe`) and the grad
    and inference modes it runs under."""
    described = (
        _describe(args, known),
        _describe(kwargs, known),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )
    return hashlib.sha256(repr(described).encode()).hexdigest()[:20]


def aot_compile_available() -> bool:
    """torch.compile's ahead-of-time compilation is there (torch >= 2.11; off by default in 2.11)."""
    return hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(
        torch.compiler, "load_compiled_function"
    )


def compile_ahead_of_time(fn: Callable, args: tuple, kwargs: dict):
    """`fn` traced and compiled for these arguments now, as a function that can be saved."""
    with torch._dynamo.config.patch(enable_aot_compile=True):  # 2.11 adds `aot_compile` only with it on
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    return compiled.aot_compile((args, kwargs))


class PrecompiledFunction:
    """`fn` compiled per input signature: loaded from `directory` when an earlier run left the artifact
    there, else compiled ahead of time and saved there. `fallback` (torch.compile'd `fn`) serves the
    signatures that cannot be compiled ahead of time. Thread-safe: several executors may share one."""

    def __init__(self, fn: Callable, name: str, directory: Path, fallback: Callable):
        # A bound method is compiled as its function; its instance becomes the first argument.
        self._bound_to = fn.__self__ if inspect.ismethod(fn) else None
        self._fn = fn.__func__ if inspect.ismethod(fn) else fn
        self.name = name
        self.directory = directory
        self._fallback = fallback
        self._entries: dict[str, Callable] = {}
        self._modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.counts: Counter = Counter()  # loaded, compiled, fallback: one per signature met

    def __call__(self, *args, **kwargs):
        if self._bound_to is not None:
            args = (self._bound_to, *args)
        key = signature(args, kwargs, self._modules)
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:  # a new signature: compiled or loaded once, and proven by its first call
                entry = self._entries.get(key)
                if entry is None:
                    entry, how = self._entry(key, args, kwargs)
                    if entry is not self._fallback:
                        try:
                            result = entry(*args, **kwargs)
                        except Exception as err:  # an artifact this torch cannot run: traced instead
                            log.warning("%s: the %s function failed (%s); tracing it", self.name, how, err)
                            entry, how = self._fallback, "fallback"
                        else:
                            self._entries[key] = entry
                            self.counts[how] += 1
                            return result
                    self._entries[key] = entry
                    self.counts[how] += 1
        if entry is self._fallback and self._bound_to is not None:
            args = args[1:]  # the fallback is the compiled bound method
        return entry(*args, **kwargs)

    def path(self, key: str) -> Path:
        return self.directory / f"{self.name}-{key}{ARTIFACT_SUFFIX}"

    def _entry(self, key: str, args: tuple, kwargs: dict) -> tuple[Callable, str]:
        """The function for one signature and how it was come by: loaded, compiled (and saved), or the
        fallback."""
        path = self.path(key)
        if path.exists():
            try:
                with path.open("rb") as artifact:
                    return torch.compiler.load_compiled_function(artifact), "loaded"
            except Exception as err:  # damaged, or from another build: compiled over below
                log.warning("%s: cannot load %s (%s); compiling it again", self.name, path, err)
        try:
            compiled = compile_ahead_of_time(self._fn, args, kwargs)
        except Exception as err:  # a graph break, or an argument the serialiser does not take
            log.warning(
                "%s: not compiled ahead of time (%s); torch.compile traces it at every start", self.name, err
            )
            return self._fallback, "fallback"
        self._save(compiled, path)
        return compiled, "compiled"

    def _save(self, compiled, path: Path) -> None:
        """Write to a temporary name and rename: a process starting beside this one (one per GPU) never
        reads half a file."""
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(partial))
            os.replace(partial, path)
        except Exception as err:  # serving goes on; the next start compiles it again
            log.warning("%s: cannot save %s (%s)", self.name, path, err)
            partial.unlink(missing_ok=True)
