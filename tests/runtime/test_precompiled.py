"""Compiled functions kept whole between starts (runtime/precompiled.py): a later start, in a process of
its own, loads every stage function instead of tracing it, and the loaded code reads the weights it is
given (a model with other weights gets its own eager reference's actions); one artifact per input
signature (functions passed as arguments told apart, the thread count in it); an argument it cannot
describe, or a call the artifact's guards refuse, is traced, not served wrongly or raised; a damaged
file, or one whose guards refuse a start's inputs, is compiled over; a function that cannot be compiled
ahead of time is traced as before, and later starts do not try again; precompile off traces."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.precompiled import PrecompiledFunction, signature
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.stages import INDUCTOR_OPTIONS, CompiledFunctions

from tests.conftest import random_observation

pytestmark = pytest.mark.usefixtures("inductor_settings_restored")

FUNCTIONS = {"stage": 3, "layer": 5}  # encode, fill, velocity; or vision, prefix, prefix_kv, expert, head


def serve_against_reference(config: RuntimeConfig, rng: np.random.Generator) -> dict[str, int]:
    """Two frames through the executor, each equal to the eager reference of the same weights; returns
    how the compiled functions were come by."""
    parts = build_parts(config)
    reference = EagerPolicy(parts=parts)
    with PipelinedExecutor(parts=parts) as executor:
        for _ in range(2):
            obs = random_observation(rng, "pi05_tiny")
            noise = rng.standard_normal(
                (config.model.action_horizon, config.model.action_dim), dtype=np.float32
            )
            got = executor.infer(obs, noise).actions
            np.testing.assert_allclose(got, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5)
        assert "functions: " in executor.describe_startup()
        return executor.report()["precompiled"]


# A later start in a process of its own (as a node's restart is): other random weights, the same shapes.
LATER_START = r"""
import json, sys
import numpy as np
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.synthetic import synthetic_observation
config = RuntimeConfig(**json.loads(sys.argv[1]))
rng = np.random.default_rng()
with PipelinedExecutor(config) as executor:
    reference = EagerPolicy(parts=executor.parts)
    worst = 0.0
    for _ in range(2):
        obs = synthetic_observation(config, rng)
        noise = rng.standard_normal((config.model.action_horizon, config.model.action_dim), dtype=np.float32)
        got, want = executor.infer(obs, noise).actions, reference.infer(obs, noise).actions
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    print(json.dumps({"precompiled": executor.report()["precompiled"], "worst": worst}))
"""


@pytest.mark.parametrize("scope", sorted(FUNCTIONS))
def test_a_later_start_loads_every_compiled_function_and_reads_its_own_weights(tmp_path, scope):
    settings = dict(preset="pi05_tiny", compile_stages=True, compile_scope=scope, compile_cache=str(tmp_path))
    config = RuntimeConfig(**settings)
    assert serve_against_reference(config, np.random.default_rng()) == {"compiled": FUNCTIONS[scope]}
    artifacts = sorted(tmp_path.glob("*/precompiled/*.aot"))
    assert len(artifacts) == FUNCTIONS[scope]  # one shape: one each
    # Every function loaded, none traced, and the actions are this model's (the artifacts hold code,
    # not weights).
    settings["seed"] = config.seed + 1
    later = subprocess.run(
        [sys.executable, "-c", LATER_START, json.dumps(settings)], capture_output=True, text=True, timeout=600
    )
    assert later.returncode == 0, later.stderr[-3000:]
    result = json.loads(later.stdout.splitlines()[-1])
    assert result["precompiled"] == {"loaded": FUNCTIONS[scope]}
    assert result["worst"] <= 1e-4
    assert sorted(tmp_path.glob("*/precompiled/*.aot")) == artifacts


def scaled_sum(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    return (x * scale + y).sum(dim=-1)


def with_a_graph_break(x: torch.Tensor) -> torch.Tensor:
    x = x + 1
    torch._dynamo.graph_break()
    return x * 2


def precompiled(fn, directory) -> PrecompiledFunction:
    return CompiledFunctions(directory).get(fn.__name__, fn, cameras=1)


def test_one_artifact_per_signature_and_a_damaged_one_is_compiled_over(tmp_path, caplog):
    fn = precompiled(scaled_sum, tmp_path)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(fn(x, y, 0.5), scaled_sum(x, y, 0.5))
    x2, y2 = torch.randn(3, 4), torch.randn(3, 4)  # new values, the same signature
    torch.testing.assert_close(fn(x2, y2, 0.5), scaled_sum(x2, y2, 0.5))
    torch.testing.assert_close(fn(x[:2], y[:2], 0.5), scaled_sum(x[:2], y[:2], 0.5))  # a new shape
    torch.testing.assert_close(fn(x, y, 2.0), scaled_sum(x, y, 2.0))  # a new constant
    assert fn.counts == {"compiled": 3}
    assert len(list(tmp_path.glob("scaled_sum-*.aot"))) == 3

    first = fn.path(next(iter(fn._entries)))
    first.write_bytes(b"not an artifact")
    again = precompiled(scaled_sum, tmp_path)  # a new start against the same directory
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(again(x, y, 0.5), scaled_sum(x, y, 0.5))
        torch.testing.assert_close(again(x[:2], y[:2], 0.5), scaled_sum(x[:2], y[:2], 0.5))
    assert again.counts == {"compiled": 1, "loaded": 1}
    assert f"cannot load {first}" in caplog.text
    third = precompiled(scaled_sum, tmp_path)  # and the next start loads what was compiled over
    torch.testing.assert_close(third(x, y, 0.5), scaled_sum(x, y, 0.5))
    assert third.counts == {"loaded": 1}


def test_a_function_with_a_graph_break_is_traced_as_before(tmp_path, caplog):
    fn = precompiled(with_a_graph_break, tmp_path)
    x = torch.randn(5)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(fn(x), with_a_graph_break(x))
    assert fn.counts == {"fallback": 1}
    assert "not compiled ahead of time" in caplog.text
    assert not list(tmp_path.glob("*.aot"))
    assert len(list(tmp_path.glob("with_a_graph_break-*.traced"))) == 1
    caplog.clear()
    again = precompiled(with_a_graph_break, tmp_path)  # a later start does not try again
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(again(x), with_a_graph_break(x))
    assert again.counts == {"fallback": 1}
    assert "not compiled ahead of time" not in caplog.text


def test_without_a_directory_torch_compile_traces_as_before():
    fn = CompiledFunctions(None).get("scaled_sum", scaled_sum, cameras=1)
    assert not isinstance(fn, PrecompiledFunction)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(fn(x, y, 1.5), scaled_sum(x, y, 1.5))


def test_an_artifact_whose_guards_refuse_the_inputs_is_compiled_over(tmp_path, monkeypatch, caplog):
    """An artifact left by an earlier start whose guards refuse this start's inputs (a module setting
    that is not in the signature, say) is compiled again and saved over."""
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    precompiled(scaled_sum, tmp_path)(x, y, 1.0)  # leaves the artifact
    load = torch.compiler.load_compiled_function

    def refusing(file, **kwargs):
        loaded = load(file, **kwargs)
        loaded.guard_check = lambda *args, **kwargs: False
        return loaded

    monkeypatch.setattr(torch.compiler, "load_compiled_function", refusing)
    again = precompiled(scaled_sum, tmp_path)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(again(x, y, 1.0), scaled_sum(x, y, 1.0))
    assert again.counts == {"compiled": 1}
    assert "does not accept these inputs (its guards); compiling it again" in caplog.text
    monkeypatch.undo()
    third = precompiled(scaled_sum, tmp_path)
    torch.testing.assert_close(third(x, y, 1.0), scaled_sum(x, y, 1.0))
    assert third.counts == {"loaded": 1}


class Scaled(torch.nn.Module):
    """A weight and a plain Python setting that forward reads: the setting is no parameter, so the
    signature does not see it; the artifact's guards do."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.weight = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.weight * self.factor


def run_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def apply(activation, x: torch.Tensor) -> torch.Tensor:
    return activation(x) + 1


def double(x):
    return 2 * x


def negate(x):
    return -x


class Opaque:
    """An argument of a kind a signature cannot describe."""

    def __init__(self, shift: float):
        self.shift = shift


def shifted(x: torch.Tensor, opaque: Opaque) -> torch.Tensor:
    return x + opaque.shift


def test_a_call_its_artifacts_guards_refuse_is_traced_not_raised(tmp_path, caplog):
    fn = precompiled(run_layer, tmp_path)
    x = torch.randn(3, 4)
    two, three = Scaled(2), Scaled(3)  # the same signature, a different setting
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        torch.testing.assert_close(fn(two, x), two(x))
        torch.testing.assert_close(fn(three, x), three(x))
        torch.testing.assert_close(fn(three, x), three(x))
    assert fn.counts == {"compiled": 1, "fallback": 1}  # the refusal logged and counted once
    assert "guards refused a call" in caplog.text


def test_functions_as_arguments_are_told_apart_and_unknown_kinds_are_traced(tmp_path):
    fn = precompiled(apply, tmp_path)
    x = torch.randn(5)
    torch.testing.assert_close(fn(double, x), apply(double, x))
    torch.testing.assert_close(fn(negate, x), apply(negate, x))  # not double's artifact
    assert fn.counts == {"compiled": 2}
    opaque = precompiled(shifted, tmp_path)
    torch.testing.assert_close(opaque(x, Opaque(1.0)), shifted(x, Opaque(1.0)))
    torch.testing.assert_close(opaque(x, Opaque(2.0)), shifted(x, Opaque(2.0)))
    assert opaque.counts == {"fallback": 1}
    assert not list(tmp_path.glob("shifted-*"))


def test_the_signature_covers_the_thread_count():
    known = weakref.WeakKeyDictionary()
    x = torch.randn(2)
    before = signature((x,), {}, known)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert signature((x,), {}, known) != before
    finally:
        torch.set_num_threads(threads)
    assert signature((x,), {}, known) == before


def test_precompile_off_leaves_tracing_to_torch_compile(tmp_path, monkeypatch):
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # fast
    config = RuntimeConfig(
        preset="pi05_tiny", compile_stages=True, compile_cache=str(tmp_path), precompile=False
    )
    with PipelinedExecutor(config) as executor:
        executor.infer(random_observation(np.random.default_rng(), "pi05_tiny"))
        assert executor.report()["precompiled"] == {}
        assert "functions:" not in executor.describe_startup()
    assert not list(tmp_path.rglob("*.aot"))


@pytest.mark.parametrize("directory", [None, "precompiled"])
def test_a_stages_inductor_options_reach_its_compiles(tmp_path, monkeypatch, directory):
    """The denoise stage's Inductor options (stages.INDUCTOR_OPTIONS) are given to torch.compile on both
    paths, traced and ahead of time; a stage without options gets none. The results stay the function's."""
    seen = []
    compile_ = torch.compile

    def recording(fn, **kwargs):
        seen.append(kwargs.get("options"))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    functions = CompiledFunctions(tmp_path / directory if directory else None)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(
        functions.get("a", scaled_sum, 1, stage="denoise")(x, y, 2.0), scaled_sum(x, y, 2.0)
    )
    torch.testing.assert_close(
        functions.get("b", scaled_sum, 1, stage="vision")(x, y, 2.0), scaled_sum(x, y, 2.0)
    )
    ahead = (
        2 if directory else 1
    )  # the traced fallback is made either way; ahead of time too with a directory
    assert seen == [INDUCTOR_OPTIONS["denoise"]] * ahead + [None] * ahead


@pytest.mark.parametrize(
    "scope, denoise_functions",
    [("stage", {"velocity"}), ("layer", {"expert_layer", "velocity_head"})],
)
def test_the_executor_compiles_the_denoise_stage_with_its_options_and_no_other(
    monkeypatch, scope, denoise_functions
):
    """As the executor compiles its stages (traced here, dynamo's eager backend for speed): the denoise
    stage's functions get stages.INDUCTOR_OPTIONS["denoise"], vision's and the prefix's none."""
    seen = {}
    compile_ = torch.compile

    def recording(fn, **kwargs):
        seen[getattr(fn, "__name__", repr(fn))] = kwargs.get("options")
        return compile_(fn, **{**kwargs, "backend": "eager", "options": None})

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", recording)
    config = RuntimeConfig(preset="pi05_tiny", compile_stages=True, compile_scope=scope, compile_cache="none")
    with PipelinedExecutor(config) as executor:
        executor.infer(random_observation(np.random.default_rng(), "pi05_tiny"))
    torch._dynamo.reset()
    assert denoise_functions <= set(seen) and len(seen) > len(denoise_functions), seen
    for name, options in seen.items():
        assert options == (INDUCTOR_OPTIONS["denoise"] if name in denoise_functions else None), name
