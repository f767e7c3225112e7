"""The `vla-runtime` command as a user runs it (the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The console script that `pip install .` put beside this interpreter.
EXE = str(Path(sys.executable).parent / "vla-runtime")


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


def test_info_lists_presets():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info["presets"]) == {"pi0", "pi05", "pi0_tiny", "pi05_tiny"} and "cpu" in info["devices"]


@pytest.mark.parametrize("preset", ["pi05_tiny", "pi0_tiny"])
def test_infer_json(preset):
    out = run("infer", "--preset", preset, "--steps", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["actions_shape"] == [10, 7] and len(result["actions"]) == 10
    assert result["steps"] == 3 and result["random_weights"] is True
    assert {"vision", "prefix", "denoise"} <= set(result["timings_ms"])


def test_infer_human_output_says_random_weights():
    out = run("infer")
    assert out.returncode == 0 and "RANDOM WEIGHTS" in out.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["--steps", "0"], "steps"),
        (["--preset", "pi9"], "preset"),
        (["--checkpoint", "/nonexistent"], "checkpoint"),
        (["--fp8-expert"], "fp8_expert: needs precision fp8"),
        (["--action-horizon", "0"], "action_horizon: must be a positive integer"),
        (["--state-in-prompt", "maybe"], "state-in-prompt"),
    ],
)
def test_bad_arguments_exit_2(args, field):
    out = run("infer", *args)
    assert out.returncode == 2 and field in out.stderr


def test_profile_captured_needs_cuda():
    out = run("profile", "--captured", "--stage", "prefix")
    assert out.returncode == 2 and "needs CUDA" in out.stderr


def test_inspect_reads_a_checkpoint_without_loading_it(tmp_path):
    from vla_runtime.graphs.config import get_preset
    from vla_runtime.graphs.weights import build_model, save_checkpoint

    model = build_model(get_preset("pi05_tiny").replace(action_horizon=6), seed=1)
    directory = save_checkpoint(
        model, tmp_path / "pi05_libero_tiny", "openpi", "lm_head", {"action_horizon": 6}
    )
    out = run("inspect", str(directory), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["family"] == "pi05" and report["action_horizon"] == 6 and report["layout"] == "openpi"
    assert report["prompt_format"] == "pi05_no_state" and report["embedding_from_lm_head"] is True
    assert report["norm_stats"] is None and report["loadable"] is True and report["problems"] == []
    human = run("inspect", str(directory))
    assert human.returncode == 0 and "pi05_no_state" in human.stdout and "NONE: refused" in human.stdout
    (directory / "config.json").write_text('{"type": "pi0"}')  # lerobot dialect, wrong family
    bad = run("inspect", str(directory))
    assert bad.returncode == 2 and "config.json type says pi0, its tensors are pi05's" in bad.stderr
    assert "Traceback" not in bad.stderr
