"""The compile cache's directory per key (runtime/compile_cache.py): a new key for a change of code, torch,
model shape or precision, the same for a setting that compiles nothing different; Inductor pointed at it
before anything compiles; warm once it holds artifacts; a directory that cannot be made is named."""

from __future__ import annotations

import os

import pytest
import torch
from vla_runtime.runtime import compile_cache
from vla_runtime.runtime.compile_cache import cache_key, use_compile_cache
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor

pytestmark = pytest.mark.usefixtures("inductor_settings_restored")


def test_the_key_follows_code_torch_model_and_precision(monkeypatch):
    base = RuntimeConfig(preset="pi05_tiny", compile_stages=True)
    key = cache_key(base)
    assert cache_key(base.replace(seed=3)) == key  # compiles the same graphs
    assert cache_key(base.replace(preset="pi0_tiny")) != key
    assert cache_key(base.replace(handover="rtc")) != key
    assert cache_key(base.replace(precision="int8")) != key
    assert cache_key(base.replace(precompile=False)) != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cache_key(base) != key
    monkeypatch.undo()
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "changed-code")
    assert cache_key(base) != key


def test_inductor_is_pointed_at_the_keys_directory_and_it_warms(tmp_path):
    import torch._inductor.config as inductor_config

    threads = 4
    inductor_config.compile_threads = threads  # put back by inductor_settings_restored
    assert use_compile_cache(RuntimeConfig(preset="pi05_tiny")) is None  # the CPU compiles nothing
    assert (
        use_compile_cache(RuntimeConfig(preset="pi05_tiny", compile_stages=True, compile_cache="none"))
        is None
    )
    config = RuntimeConfig(preset="pi05_tiny", compile_stages=True, compile_cache=str(tmp_path))
    with PipelinedExecutor(config) as executor:
        cache = executor.compile_cache
        assert cache.path == tmp_path / cache_key(config) and not cache.warm
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.path)
        assert executor.report()["compile_cache"] == f"compile cache cold: {cache.path}"
        assert set(executor.report()["startup_s"]) == {"weights", "compile_and_capture"}
        assert executor.describe_startup().endswith(f"; compile cache cold: {cache.path}")
    (cache.path / "fxgraph").mkdir()  # what Inductor leaves behind
    assert inductor_config.compile_threads == threads  # cold: Inductor's pool of compile workers
    assert use_compile_cache(config).warm
    assert inductor_config.compile_threads == 1  # warm: kernels are loaded, no pool is started


def test_a_cache_directory_that_cannot_be_made_is_named():
    config = RuntimeConfig(preset="pi05_tiny", compile_stages=True, compile_cache="/proc/no/such/place")
    with pytest.raises(ValueError, match="compile_cache: cannot create /proc/no/such/place"):
        use_compile_cache(config)


def test_start_up_is_broken_down_by_phase_with_quantisation_where_there_is_one():
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", precision="int8")) as executor:
        phases = executor.report()["startup_s"]
        assert list(phases) == ["weights", "quantise", "compile_and_capture"]
        assert all(seconds >= 0 for seconds in phases.values())
        assert (
            executor.describe_startup().startswith("weights ") and " quantise " in executor.describe_startup()
        )


def test_synthetic_fp8_scales_are_kept_for_the_next_start_and_a_bad_file_is_calibrated_over(
    tmp_path, monkeypatch
):
    """FP8 serving needs a GPU, its calibration does not: on bf16 parts with the support check passed, the
    first preparation calibrates and keeps the scales under compile_cache, the second loads them (no
    calibration). A file made for other weights, a damaged one, or a path that cannot be written: start-up
    calibrates and serves."""
    from vla_runtime.graphs import fp8
    from vla_runtime.runtime import calibration
    from vla_runtime.runtime.compile_cache import synthetic_fp8_scales_path
    from vla_runtime.runtime.loading import build_parts, prepare_fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))
    calibrations = []
    calibrate = calibration.calibrate_scales
    monkeypatch.setattr(
        calibration, "calibrate_scales", lambda *a, **k: calibrations.append(1) or calibrate(*a, **k)
    )

    def prepared(config):
        parts = build_parts(config)
        prepare_fp8(parts)
        return parts, [m.input_scale.item() for m in fp8.fp8_modules(parts.model.prefix_lm).values()]

    config = RuntimeConfig(preset="pi05_tiny", precision="bf16", compile_cache=str(tmp_path))
    first, first_scales = prepared(config)
    kept = synthetic_fp8_scales_path(config, first.weights_id)
    assert kept.exists() and len(calibrations) == 1
    _, second_scales = prepared(config)
    assert len(calibrations) == 1 and second_scales == first_scales  # loaded, not calibrated
    assert synthetic_fp8_scales_path(config.replace(seed=1), "random-seed1") != kept
    assert synthetic_fp8_scales_path(config.replace(compile_cache="none"), first.weights_id) is None
    other = config.replace(seed=1)
    other_kept = synthetic_fp8_scales_path(other, build_parts(other).weights_id)
    other_kept.write_bytes(kept.read_bytes())  # scales made for the seed-0 weights, under seed 1's name
    prepared(other)
    assert len(calibrations) == 2  # refused (another weights' identity), calibrated
    kept.write_bytes(b"not safetensors")
    prepared(config)
    assert len(calibrations) == 3 and kept.read_bytes() != b"not safetensors"  # calibrated, kept anew
    kept.unlink()
    kept.mkdir()  # a path that cannot be written
    _, scales = prepared(config)
    assert len(calibrations) == 4 and scales == first_scales and kept.is_dir()


def test_a_start_that_cannot_keep_pythons_bytecode_says_how_to(tmp_path, monkeypatch):
    """Where torch's modules were compiled from source with nowhere to keep the bytecode, the ready line
    says so and names PYTHONPYCACHEPREFIX; where the bytecode is kept, it says nothing of it."""
    import types

    from vla_runtime.runtime.python_bytecode import BYTECODE_HINT, bytecode_kept

    assert bytecode_kept()  # this environment keeps it (or pip compiled it at install)
    assert not bytecode_kept(types.SimpleNamespace(__cached__=str(tmp_path / "never-written.pyc")))
    assert bytecode_kept(types.SimpleNamespace(__cached__=None))  # a module with no source (built in)
    config = RuntimeConfig(preset="pi05_tiny", compile_stages=True, compile_cache=str(tmp_path))
    with PipelinedExecutor(config) as executor:
        assert BYTECODE_HINT not in executor.describe_startup()
        monkeypatch.setattr("vla_runtime.runtime.executor.bytecode_kept", lambda: False)
        assert executor.describe_startup().endswith(f"; {BYTECODE_HINT}")
        assert "PYTHONPYCACHEPREFIX" in BYTECODE_HINT
