"""The `vla-runtime` command as a user runs it (the installed console script)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
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
        (["--action-horizon", "0"], "argument --action-horizon: must be in [1, 1000], got 0"),
        (["--state-in-prompt", "maybe"], "state-in-prompt"),
    ],
)
def test_bad_arguments_exit_2(args, field):
    out = run("infer", *args)
    assert out.returncode == 2 and field in out.stderr


# Each entry point's refusals (docs/cli.md has the table): exit 2, the option named, no traceback.
REFUSED = [
    (["infer", "--frames", "0"], "argument --frames: must be at least 1, got 0"),
    (["infer", "--pipelining", "latency"], "--pipelining: infer runs the eager reference"),
    (["infer", "--shape-profiles"], "--shape-profiles: infer runs the eager reference"),
    (["infer", "--device-timeout-s", "5"], "--device-timeout-s: infer runs the eager reference"),
    (["infer", "--frames", "-5"], "argument --frames: must be at least 1"),
    (["infer", "--tokenizer", "{garbage}"], "tokenizer: "),
    (["infer", "--tokenizer", "{empty}"], "tokenizer: "),
    (["infer", "--robot", "franka"], "robot: "),
    (["accuracy", "--frames", "0"], "argument --frames: must be at least 1"),
    (["accuracy", "--skip-frames", "-1"], "argument --skip-frames: must be at least 0"),
    (["accuracy", "--skip-frames", "3"], "--skip-frames: skips recorded observations; give them with"),
    (["infer", "--integer-stages", "prefix"], "integer_stages: chooses the stacks int8 / w4a8 quantise"),
    (
        ["infer", "--precision", "int8", "--integer-calibration", "x.mcap"],
        "integer_calibration: fits the w4a8",
    ),
    (["eval-libero", "--trials", "0"], "argument --trials: must be at least 1"),
    (["eval-libero", "--max-steps", "0"], "argument --max-steps: must be at least 1"),
    (["eval-libero", "--replan-steps", "0"], "argument --replan-steps: must be at least 1"),
    (
        ["eval-libero", "--replan-steps", "11"],
        "--replan-steps: 11, but a chunk of pi05_tiny offers 10 actions",
    ),
    (
        ["eval-libero", "--delay-steps", "3"],
        "--delay-steps: 3, but a chunk of 10 actions taken up from action 3",
    ),
    (["eval-libero", "--tasks", "abc"], "argument --tasks: 'abc' is not a comma-separated list"),
    (["eval-libero", "--suite", "libero_nope"], "argument --suite: invalid choice: 'libero_nope'"),
    (["eval-libero", "--endpoint", "notaurl"], "argument --endpoint: 'notaurl' is not a ZeroMQ endpoint"),
    (["eval-libero", "--out", "/proc/nope/out"], "--out: cannot create /proc/nope/out"),
    (["demo", "--max-steps", "-3"], "argument --max-steps: must be at least 1, got -3"),
    (["demo", "--out", "/proc/nope/out"], "--out: cannot create /proc/nope/out"),
    (["profile", "--out", "/proc/nope/out"], "--out: cannot create /proc/nope/out"),
    (["profile", "--top", "0"], "argument --top: must be at least 1"),
    (
        ["calibrate", "--observations", "x.mcap", "--out", "s.safetensors", "--fp8-calibration-margin", "0"],
        "--fp8-calibration-margin: must be in [1.0, 4.0], got 0",
    ),
    (["node", "--rate-hz", "0"], "argument --rate-hz: must be > 0"),
    # rcl would resolve this set to the params file's value without a word (a type other than the file's)
    (
        ["fleet", "--namespaces", "/a", "--ros-args", "--bogus"],
        "unknown ROS arguments after --ros-args: ['--bogus']",
    ),
    (["fleet", "--namespaces", "/a,/b", "--ros-args", "-p", "steps:=abc"], "steps:=abc: expected int"),
    (["demo", "--device", "cuda"], "device: cuda requested but CUDA is not available"),  # before any server
    (["calibrate", "--observations", "x.mcap", "--out", "{folder}"], "--out: {folder} is not a regular file"),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_input_exits_2_naming_the_option(tmp_path, args, message):
    garbage, empty = tmp_path / "garbage.model", tmp_path / "empty.model"
    garbage.write_bytes(np.random.default_rng().bytes(1000))
    empty.write_bytes(b"")
    out = run(*[a.format(garbage=garbage, empty=empty, folder=tmp_path) for a in args])
    message = message.format(folder=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_recording_that_exists_is_refused_before_anything_and_the_last_report_stays(tmp_path):
    """eval-libero --record to an existing file: refused before the sim server starts, so the earlier
    run's report in --out is not removed (it was, by a run refused only once its recorder opened)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.md").write_text("the last run's")
    existing = tmp_path / "obs.mcap"
    existing.write_bytes(b"an earlier recording")
    done = run("eval-libero", "--out", str(out), "--record", str(existing))
    assert done.returncode == 2 and f"record: {existing} exists" in done.stderr, done.stderr[-2000:]
    assert (out / "report.md").read_text() == "the last run's" and not (out / "sim_server.log").exists()


def test_node_shortcuts_reach_ros_as_the_strings_given():
    """`vla-runtime node/fleet --checkpoint/--device ...` become `-p name:=value`, which rcl reads as YAML:
    each value in JSON, so a path like 2024, yes, [x] or 'ck #1' stays that string."""
    import argparse

    import yaml
    from vla_runtime.cli import node_ros_args

    for text in ("2024", "yes", "[x]", "ck #1", "/data/pi05"):
        args = argparse.Namespace(
            params_file=None, preset=None, checkpoint=text, device="cpu", precision=None, rate_hz=None
        )
        argv = node_ros_args(args)
        values = dict(a.split(":=", 1) for a in argv if ":=" in a)
        assert yaml.safe_load(values["checkpoint"]) == text and yaml.safe_load(values["device"]) == "cpu"


def test_the_same_seed_repeats_the_actions():
    first, second, other = (run("infer", "--seed", seed, "--json") for seed in ("3", "3", "4"))
    actions = [json.loads(o.stdout)["actions"] for o in (first, second, other)]
    assert actions[0] == actions[1] and actions[0] != actions[2]


def test_a_closed_pipe_ends_quietly():
    reader = subprocess.run(
        f"'{EXE}' info | head -c 10", shell=True, capture_output=True, text=True, timeout=300
    )
    writer = subprocess.run(
        f"'{EXE}' infer --frames 2 | true", shell=True, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in reader.stderr + writer.stderr and "Broken pipe" not in writer.stderr


def test_ctrl_c_ends_cleanly():
    proc = subprocess.Popen([EXE, "infer", "--frames", "100000"], stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=8)  # start-up; it cannot finish 100000 frames
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


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
    (directory / "tokenizer.model").write_bytes(b"not sentencepiece")  # a name infer would try
    (directory / "assets" / "robot").mkdir(parents=True)
    (directory / "assets" / "robot" / "norm_stats.json").write_text("{not json")
    broken = run("inspect", str(directory), "--json")
    assert broken.returncode == 2 and not json.loads(broken.stdout)["loadable"]
    problems = "\n".join(json.loads(broken.stdout)["problems"])
    assert "is not a SentencePiece model" in problems and "norm_stats: cannot read" in problems, problems
    (directory / "config.json").write_text('{"type": "pi0"}')  # lerobot dialect, wrong family
    bad = run("inspect", str(directory))
    assert bad.returncode == 2 and "config.json type says pi0, its tensors are pi05's" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_sim_server_that_cannot_start_is_reported_without_a_traceback(tmp_path):
    """VLA_LIBERO_PYTHON pointing at a Python without LIBERO (this one): the sim server dies importing it,
    and eval-libero says so in one line with the log's last line and the variable to set."""
    env = {**os.environ, "VLA_LIBERO_PYTHON": sys.executable}
    run = subprocess.run(
        [EXE, "eval-libero", "--max-steps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "sim server exited with" in run.stderr and "No module named" in run.stderr, run.stderr
    assert "VLA_LIBERO_PYTHON" in run.stderr
