"""Compiled functions kept whole between starts (runtime/precompiled.py): a warm start loads every stage
function instead of tracing it, and the loaded code reads the weights it is given (a second model with
other weights gets its own eager reference's actions); one artifact per input signature; a damaged file
is compiled over; a function that cannot be compiled ahead of time is traced as before."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.precompiled import PrecompiledFunction
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.stages import CompiledFunctions

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


@pytest.mark.parametrize("scope", sorted(FUNCTIONS))
def test_a_warm_start_loads_every_compiled_function_and_reads_its_own_weights(tmp_path, scope):
    rng = np.random.default_rng()
    config = RuntimeConfig(
        preset="pi05_tiny", compile_stages=True, compile_scope=scope, compile_cache=str(tmp_path)
    )
    assert serve_against_reference(config, rng) == {"compiled": FUNCTIONS[scope]}  # one shape: one each
    artifacts = sorted(tmp_path.glob("*/precompiled/*.aot"))
    assert len(artifacts) == FUNCTIONS[scope]
    # Other random weights, the same shapes: every function loaded, none traced, and the actions are this
    # model's (the artifacts hold code, not weights).
    assert serve_against_reference(config.replace(seed=config.seed + 1), rng) == {"loaded": FUNCTIONS[scope]}
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


def test_without_a_directory_torch_compile_traces_as_before():
    fn = CompiledFunctions(None).get("scaled_sum", scaled_sum, cameras=1)
    assert not isinstance(fn, PrecompiledFunction)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(fn(x, y, 1.5), scaled_sum(x, y, 1.5))


def test_an_artifact_that_fails_its_first_call_is_traced_instead(tmp_path, monkeypatch, caplog):
    """An artifact this torch loads but cannot run (a guard it fails, say): the call is answered by
    torch.compile's tracing, and that signature stays with it."""
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    precompiled(scaled_sum, tmp_path)(x, y, 1.0)  # leaves the artifact

    def unrunnable(file, **_):
        def run(*args, **kwargs):
            raise RuntimeError("GuardManager check failed")

        return run

    monkeypatch.setattr(torch.compiler, "load_compiled_function", unrunnable)
    again = precompiled(scaled_sum, tmp_path)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            torch.testing.assert_close(again(x, y, 1.0), scaled_sum(x, y, 1.0))
    assert again.counts == {"fallback": 1}
    assert "the loaded function failed (GuardManager check failed)" in caplog.text


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
