"""FP8 scales from recorded observations: `vla-runtime calibrate` on a recording, scales with metadata,
a file made for other weights, another shape or another set of GEMMs refused. Calibration observes the
activations in high precision, so all of this runs on the CPU; serving in FP8 needs the GPU tier."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open
from vla_runtime.cli import main
from vla_runtime.runtime.calibration import attach_fp8, load_scales, read_metadata
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.recording import ObservationRecorder

from ..conftest import random_observation


@pytest.fixture
def recording(tmp_path, rng):
    path = tmp_path / "episode.mcap"
    with ObservationRecorder(path) as rec:
        for i in range(4):
            obs = random_observation(rng, skip=("right_wrist_0_rgb",))
            obs.timestamp = 10.0 + 0.05 * i
            rec.write(obs)
    return path


def scales(path) -> dict[str, float]:
    with safe_open(str(path), framework="np") as f:
        return {k: float(f.get_tensor(k)[0]) for k in f.keys()}


def calibrate(recording, out, *extra):
    return main(["calibrate", "--observations", str(recording), "--out", str(out), "--seed", "5", *extra])


def test_calibrate_from_a_recording_writes_scales_with_metadata(tmp_path, recording):
    out = tmp_path / "scales.safetensors"
    assert calibrate(recording, out, "--fp8-expert", "--fp8-calibration-margin", "1") == 0
    meta = read_metadata(out)
    assert meta["weights"] == "random-seed5" and meta["model_id"] == "pi05_tiny:random-seed5"
    assert meta["fp8_expert"] == "true"
    assert (meta["frames"], meta["holdout_frames"], meta["margin"]) == ("3", "1", "1")
    assert meta["source"] == str(recording) and meta["steps"] == "10"
    assert 0.0 <= float(meta["clamped_fraction_holdout"]) < 0.5
    values = scales(out)
    # qkv, o, gate_up, down per prefix layer (the last computes only keys/values) and per expert layer
    assert len(values) == (4 + 1) + 4 * 2 and any(k.startswith("expert.") for k in values)
    assert all(np.isfinite(v) and v > 0 for v in values.values())
    # the margin scales every activation scale exactly; more headroom never clamps more
    wide = tmp_path / "wide.safetensors"
    assert calibrate(recording, wide, "--fp8-expert", "--fp8-calibration-margin", "2") == 0
    for k, v in scales(wide).items():
        assert v == pytest.approx(2 * values[k], rel=1e-6)
    assert float(read_metadata(wide)["clamped_fraction_holdout"]) <= float(meta["clamped_fraction_holdout"])


def test_scales_for_other_weights_shape_or_gemms_are_refused(tmp_path, recording):
    out = tmp_path / "scales.safetensors"
    assert calibrate(recording, out) == 0
    same = build_parts(RuntimeConfig(seed=5))
    load_scales(same, attach_fp8(same, False), out, False)  # made for it: loads
    for config, expert, named in (
        (RuntimeConfig(seed=6), False, "weights"),
        (RuntimeConfig(seed=5, action_horizon=6), False, "model_shape"),
        (RuntimeConfig(seed=5), True, "fp8_expert"),
    ):
        parts = build_parts(config)
        with pytest.raises(ValueError, match=f"fp8_calibration: .* was not made for this model .*{named}"):
            load_scales(parts, attach_fp8(parts, expert), out, expert)


def test_scales_are_only_for_fp8(tmp_path):
    with pytest.raises(ValueError, match="fp8_calibration: scales are for precision fp8, not bf16"):
        RuntimeConfig(precision="bf16", fp8_calibration=str(tmp_path / "s.safetensors"))


def test_bad_calibrate_arguments_exit_2(tmp_path, recording, capsys):
    assert calibrate(tmp_path / "missing.mcap", tmp_path / "s.safetensors") == 2
    assert "observations: no file" in capsys.readouterr().err
    assert calibrate(recording, tmp_path / "s.safetensors", "--fp8-calibration-margin", "0.5") == 2
    assert "--fp8-calibration-margin: must be in [1.0, 4.0]" in capsys.readouterr().err
    assert calibrate(recording, "/proc/nope/s.safetensors") == 2
    assert "--out: cannot write /proc/nope/s.safetensors" in capsys.readouterr().err  # before the work


def test_accuracy_gates_on_recorded_observations(recording):
    from vla_runtime.runtime.accuracy import accuracy_table
    from vla_runtime.runtime.recording import read_observations

    config = RuntimeConfig(precision="bf16", seed=3)
    observations = read_observations(recording, config.model.camera_names, config.state_dim)
    result = accuracy_table(config, frames=2, observations=observations)
    assert result["observations"] == "recorded" and result["frames"] == 2
    assert {r["name"] for r in result["rows"]} >= {"actions"}
