"""The real LIBERO sim server (its own environment, its own process) and closed-loop episodes through both
paths. Needs `make libero` (which `make test` runs first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from vla_runtime.graphs.config import get_preset
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.recording import read_observations
from vla_runtime.sim import protocol
from vla_runtime.sim.client import SimClient
from vla_runtime.sim.episode import InProcessLink, run_episode
from vla_runtime.sim.launcher import SimServerProcess

SUITE = "libero_spatial"
CLI = str(Path(sys.executable).parent / "vla-runtime")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with SimServerProcess(log_path=tmp_path_factory.mktemp("sim") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = SimClient(server.endpoint, timeout_s=120)
    yield c
    c.close()


def process_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


def test_simulators_are_single_threaded_unless_the_environment_says(server, monkeypatch, tmp_path):
    """One simulator per CPU: no BLAS / OpenMP pool per simulator, unless the user sets one."""
    env = process_environment(server.proc.pid)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env[name] == os.environ.get(name, "1"), name
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    with SimServerProcess(log_path=tmp_path / "server.log") as other:
        assert process_environment(other.proc.pid)["OPENBLAS_NUM_THREADS"] == "3"


def test_lists_and_reset_observation(client):
    assert SUITE in client.suites()
    tasks = client.tasks(SUITE)
    assert len(tasks) == 10 and tasks[0]["init_states"] == 50 and "bowl" in tasks[0]["instruction"]
    obs = client.reset(SUITE, 0, init_state=0, settle_steps=1)
    # rendered at openpi's 256 (the runtime resizes to the model's size)
    assert obs["agentview"].shape == (256, 256, 3) and obs["agentview"].dtype == np.uint8
    assert obs["wrist"].shape == (256, 256, 3) and obs["state"].shape == (8,)
    np.testing.assert_allclose(
        obs["state"], np.concatenate([obs["eef_pos"], obs["eef_axis_angle"], obs["gripper_qpos"]]), rtol=1e-6
    )
    reply = client.step(np.zeros(7, np.float32))
    assert (
        reply["observation"]["step"] == 1
        and reply["success"] is False  # one zero action does not solve a task
        and isinstance(reply["done"], bool)
    )


MALFORMED = [
    (b"\xc1garbage", "message: not valid msgpack"),
    (msgpack.packb({"v": 2, "op": "list_suites"}, use_bin_type=True), "v: protocol version 2"),
    (protocol.encode({"op": "step", "action": np.zeros(6, np.float32)}), "action: must be float [7]"),
    (protocol.encode({"op": "reset", "suite": SUITE}), "task: missing"),
    (protocol.encode({"op": "reset", "suite": SUITE, "task": 99}), "task: 99 out of range"),
    (
        protocol.encode({"op": "reset", "suite": SUITE, "task": 0, "init_state": 500}),
        "init_state: 500 out of range",
    ),
    (protocol.encode({"op": "list_tasks", "suite": "no_such_suite"}), "suite: unknown suite"),
    (b"\x00" * (protocol.MAX_MESSAGE_BYTES + 10), "exceeds the limit"),
]


@pytest.mark.parametrize("payload, error", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_requests_get_error_replies_and_server_keeps_serving(client, payload, error):
    reply = client.call_raw(payload)
    assert reply["ok"] is False and error in reply["error"]
    assert SUITE in client.suites()  # still serving


def test_a_client_vanishing_mid_episode_does_not_take_the_server_down(server, client):
    client.reset(SUITE, 0, settle_steps=0)
    ghost = zmq.Context.instance().socket(zmq.REQ)
    ghost.connect(server.endpoint)
    ghost.send(protocol.request("step", action=np.zeros(7, np.float32)))
    ghost.close(linger=0)  # gone before its reply
    assert client.reset(SUITE, 0, settle_steps=0)["step"] == 0
    assert client.step(np.zeros(7, np.float32))["ok"]


def test_one_episode_in_process_with_per_step_success(client):
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny")) as policy:
        link = InProcessLink(policy, lockstep=True)
        result = run_episode(client, link, SUITE, 1, 0, max_steps=20, replan_steps=5, settle_steps=2)
    assert result.steps == 20 and len(result.success_per_step) == 20  # random weights never succeed early
    assert result.chunks == 4 and len(result.engine_ms["denoise"]) == 4 and len(result.chunk_age_ms) == 4
    assert result.executed_indices == [0, 1, 2, 3, 4] * 4
    assert result.success is False and not any(result.success_per_step)  # random weights


class Seen:
    """A policy that records what it is offered, and a sim client that counts the steps it rendered."""

    def __init__(self, inner):
        self.inner, self.offered, self.rendered = inner, [], 0

    def submit(self, obs, noise=None, previous=None):
        self.offered.append(obs)
        return self.inner.submit(obs, noise=noise, previous=previous)

    def reset(self, *args):
        return self.inner.reset(*args)

    def step(self, action, render=True):
        reply = self.inner.step(action, render=render)
        self.rendered += "agentview" in reply["observation"]
        return reply

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_only_observed_steps_render(client, tmp_path):
    """Lockstep: only a cycle's last step renders its cameras (the next offer sends them), none after the
    episode's last step; with a video every step renders."""
    for video_dir, expected in ((tmp_path / "video", 15), (None, 2)):  # 2: after steps 5 and 10
        with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny")) as executor:
            policy, sim = Seen(executor), Seen(client)
            link = InProcessLink(policy, lockstep=True)
            result = run_episode(
                sim, link, SUITE, 0, 0, max_steps=15, replan_steps=5, settle_steps=2, video_dir=video_dir
            )
        assert result.steps == 15 and sim.rendered == expected and len(policy.offered) == 3
        for obs in policy.offered:  # real renderings, not the blank stand-in
            assert all(image.dtype == np.uint8 and image.any() for image in obs.images.values())


def test_skipping_the_cameras_leaves_the_physics_alone(client):
    """The same actions from the same initial state, every step rendered or only the last: the same
    robot state at every step; images only where rendered. (Images of two episodes are not compared: in
    a trial they differed where the robot's state did not; why was not established.)"""
    rng = np.random.default_rng(0)
    actions = [np.r_[rng.uniform(-1, 1, 6), -1.0].astype(np.float32) for _ in range(8)]
    states = {}
    for every in (True, False):
        client.reset(SUITE, 0, settle_steps=2)
        states[every] = []
        for k, action in enumerate(actions):
            rendered = every or k == len(actions) - 1
            obs = client.step(action, render=rendered)["observation"]
            assert ("agentview" in obs and "wrist" in obs) == rendered
            if rendered:
                assert obs["agentview"].shape == (256, 256, 3) and obs["agentview"].any()
            states[every].append(obs["state"])
    np.testing.assert_array_equal(np.stack(states[True]), np.stack(states[False]))


OURS_AGAINST_OPENPI = """
import json, pathlib, sys
import numpy as np
from libero.libero import get_libero_path
from libero.libero.envs import OffScreenRenderEnv
from vla_runtime.sim.libero_env import CAMERAS, DUMMY_ACTION, IMAGE_SIZE, LiberoSim

suite, task, settle, seed = sys.argv[1], int(sys.argv[3]), 2, 7
rng = np.random.default_rng(int(sys.argv[2]))
actions = {k: rng.uniform(-1, 1, (12, 7)) for k in (0, 1, 2)}  # per init state (gripper included)

# the whole MuJoCo state but the time, the fixtures' places (in the model), both images, reward, success
def trace(env, obs, reward, success):
    images = np.concatenate([obs[name].ravel() for name in CAMERAS.values()])
    state = np.concatenate([env.sim.get_state().flatten()[1:], env.sim.model.body_pos.ravel()])
    return state, images, reward, success

ours = LiberoSim()
ours_traces = {}
for k in (2, 0, 1):  # out of order: first the third trial, then the first again
    ours.reset(suite, task, k, seed, settle)
    for action in actions[k]:
        ours._set_cameras(True)
        obs, reward, _, _ = ours._env.step(action.tolist())
        ours_traces.setdefault(k, []).append(trace(ours._env.env, obs, reward, ours._env.check_success()))

# openpi's LIBERO loop: one environment per task (LIBERO's default hard reset), seeded once, trials in order
spec = ours.suite(suite).get_task(task)
bddl = pathlib.Path(get_libero_path("bddl_files")) / spec.problem_folder / spec.bddl_file
reference = OffScreenRenderEnv(bddl_file_name=str(bddl), camera_heights=IMAGE_SIZE, camera_widths=IMAGE_SIZE)
reference.seed(seed)
init_states = ours.suite(suite).get_task_init_states(task)
reference_traces = {}
for k in (0, 1, 2):
    reference.reset()
    reference.set_init_state(init_states[k])
    for _ in range(settle):
        reference.step(DUMMY_ACTION)
    for action in actions[k]:
        obs, reward, _, _ = reference.step(action.tolist())
        step = trace(reference.env, obs, reward, reference.check_success())
        reference_traces.setdefault(k, []).append(step)

same = {
    k: sum(
        bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:])
        for a, b in zip(ours_traces[k], reference_traces[k])
    )
    for k in actions
}
moved = float(np.abs(ours_traces[0][-1][0] - ours_traces[0][0][0]).max())
# what the drawing guards against: openpi's trials differ in their fixtures, not only in the init state
fixtures_differ = not np.array_equal(reference_traces[0][0][0][-3 * reference.sim.model.nbody :],
                                     reference_traces[2][0][0][-3 * reference.sim.model.nbody :])
print(json.dumps({"steps": {k: len(t) for k, t in ours_traces.items()}, "same": same, "moved": moved,
                  "fixtures_differ": fixtures_differ}))
"""


@pytest.mark.parametrize("suite, task", [(SUITE, 0), ("libero_goal", 7)])  # 7: turn on the stove
def test_episodes_equal_openpis_loop_whatever_ran_before(suite, task):
    """LiberoSim against openpi's LIBERO loop (LIBERO's default hard reset, the model rebuilt every trial;
    one environment per task, seeded once, trials 0, 1, 2 in order), each trial with fresh random actions
    (the gripper's too): ours runs them out of order (2, then 0, then 1) with soft resets, as a worker with
    a later share of the trials would. Step by step, the whole MuJoCo state, both cameras' images, reward
    and success are equal to the bit, and so are the fixtures' places (in the model: the init state does
    not set them), which differ between openpi's trials 0 and 2. (Without the gripper's command zeroed
    the later trials' states differ; without drawing trial k as the (k+1)-th reset its fixtures do.)"""
    from vla_runtime.sim.launcher import libero_python

    seed = int(np.random.default_rng().integers(1 << 30))
    done = subprocess.run(
        [str(libero_python()), "-c", OURS_AGAINST_OPENPI, suite, str(seed), str(task)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == {"0": 12, "1": 12, "2": 12}
    assert result["moved"] > 1e-3 and result["fixtures_differ"]  # the comparison has teeth
    assert result["same"] == {"0": 12, "1": 12, "2": 12}, f"seed {seed}: {result}"


def test_an_injected_delay_runs_the_old_chunk_then_the_new_one_from_its_frozen_actions(client):
    """rtc with a delay of 2: after each observation two more actions of the old chunk run, then the new
    chunk from its action 2 on (its frozen actions are the old chunk's); every hand-over is measured."""
    with PipelinedExecutor(RuntimeConfig(preset="pi05_tiny", handover="rtc")) as policy:
        link = InProcessLink(policy, lockstep=True)
        result = run_episode(
            client, link, SUITE, 1, 0, max_steps=19, replan_steps=5, delay_steps=2, settle_steps=2
        )
    assert result.steps == 19 and result.chunks == 3  # 5, then (2 old + 5 new) twice
    assert result.executed_indices == [0, 1, 2, 3, 4] + [2, 3, 4, 5, 6] * 2
    assert len(result.splice_jumps) == 2 and len(result.step_sizes) == 16
    assert all(np.isfinite(result.splice_jumps))


def test_demo_runs_an_episode_through_ros_and_in_process_and_reports_both(tmp_path):
    """`vla-runtime demo`: sim server + policy node process + sim bridge (lockstep on sim time), then the
    same episode in-process; one latency figure and one miss count, by one definition, for both."""
    out = tmp_path / "demo"
    run = subprocess.run(
        # 24 steps: past step 20, where the lockstep clock (1000 + 20 x 0.05 s) first crosses a whole second
        [CLI, "demo", "--max-steps", "24", "--out", str(out), "--record", str(tmp_path / "node.mcap")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ROS_DOMAIN_ID": "201"},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "RANDOM WEIGHTS" in run.stdout and "report:" in run.stdout
    assert run.stdout.count("latency: p50") == 2 and run.stdout.count("deadline misses:") == 2
    assert "age = chunk at the robot - observation taken" in run.stdout
    table = run.stdout.split("the two paths, by one definition")[1].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["ROS", "in-process"]
    for folder, path in ((out, "ros lockstep"), (out / "in-process", "in-process lockstep")):
        results = json.loads((folder / "results.json").read_text())
        episode = results["episodes"][0]
        assert results["path"] == path and episode["steps"] == 24 and episode["late_actions"] == 0
        # a chunk every 5 actions (pi05_tiny's n_action_steps): steps 0, 5, 10, 15, 20
        assert len(episode["success_per_step"]) == episode["steps"] and episode["chunks"] == 5
        summary = results["summary"]
        assert summary["deadline_misses"] <= summary["chunks"] == 5
        assert summary["definitions"]["miss"].startswith("miss = no chunk for an observation")
    ros = json.loads((out / "results.json").read_text())["episodes"][0]
    assert ros["policy_diagnostics"]["model_id"].startswith("pi05_tiny")
    assert ros["policy_diagnostics"]["misses"] == "0"  # on sim time, the lockstep robot never waits
    assert (out / "report.md").read_text().startswith("# LIBERO closed-loop evaluation")
    assert (out / "latency_histogram.png").stat().st_size > 1000
    assert list(out.glob("*.gif"))
    # the policy node recorded what it served: LIBERO's two cameras, the state and the instruction
    served = read_observations(tmp_path / "node.mcap", get_preset("pi05_tiny").camera_names, 8)
    assert len(served) >= 4 and set(served[0].images) == {"base_0_rgb", "left_wrist_0_rgb"}
    assert served[0].images["base_0_rgb"].shape == (256, 256, 3)  # as rendered; the node resizes


def test_eval_libero_cli_in_process_json(tmp_path, server):
    run = subprocess.run(
        [
            CLI,
            "eval-libero",
            "--suite",
            SUITE,
            "--tasks",
            "2",
            "--max-steps",
            "20",
            "--settle-steps",
            "1",
            "--endpoint",
            server.endpoint,
            "--out",
            str(tmp_path),
            "--json",
            "--record",
            str(tmp_path / "episode.mcap"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (
        summary["episodes"] == 1
        and summary["random_weights"] is True
        and "libero_spatial/2" in summary["tasks"]
    )
    assert summary["chunks"] == 4 and summary["engine_total_ms"]["p50"] > 0
    # every chunk's age (offer -> received) contains its engine time (submit -> done), so the medians too
    assert summary["chunk_age_ms"]["p50"] >= summary["engine_total_ms"]["p50"]
    # the run's wall time is its one episode's and the loop's bookkeeping, not the policy's start-up (it
    # once was, which overstated every --workers speed-up against one worker)
    assert summary["time"]["episodes_s"] - 0.05 <= summary["wall_s"] <= summary["time"]["episodes_s"] + 1.0
    # FP8 scales from the recorded episode (20 steps, a chunk every 5: 4 observations), and the accuracy
    # gates on the same recording
    recorded = read_observations(tmp_path / "episode.mcap", get_preset("pi05_tiny").camera_names, 8)
    assert len(recorded) == 4 and recorded[0].instruction
    scales = tmp_path / "scales.safetensors"
    cal = subprocess.run(
        [CLI, "calibrate", "--observations", str(tmp_path / "episode.mcap"), "--out", str(scales), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cal.returncode == 0, cal.stderr[-3000:]
    meta = json.loads(cal.stdout)
    assert meta["frames"] == "3" and meta["holdout_frames"] == "1" and meta["source"].endswith("episode.mcap")
    acc = subprocess.run(
        [CLI, "accuracy", "--precision", "bf16", "--observations", str(tmp_path / "episode.mcap"), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = json.loads(acc.stdout)
    assert table["observations"] == "recorded" and table["frames"] == 4, acc.stderr[-2000:]


def test_parallel_workers_share_one_batched_server(tmp_path):
    """--workers 2: two sim servers, one policy server batching both workers' observations; the merged
    report has every episode, a confidence interval per task and the episodes per hour."""
    run = subprocess.run(
        [CLI, "eval-libero", "--suite", SUITE, "--tasks", "0,1", "--max-steps", "10", "--settle-steps", "1"]
        + ["--workers", "2", "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2 and summary["workers"] == 2 and summary["episodes_per_hour"] > 0
    assert set(summary["tasks"]) == {f"{SUITE}/0", f"{SUITE}/1"}
    for task in summary["tasks"].values():
        lo, hi = task["success_ci95"]
        assert 0.0 <= lo <= task["success_rate"] <= hi <= 1.0
    assert summary["chunks"] == 4  # 10 steps, a chunk every 5, per episode
    # where the episodes' time went: the simulator's own time inside each step's round trip, the parts
    # inside the episodes' time
    t = summary["time"]
    assert 0 < t["simulator_s"] <= t["steps_s"] and t["resets_s"] > 0 and t["chunk_waits_s"] > 0
    assert t["resets_s"] + t["steps_s"] + t["chunk_waits_s"] <= t["episodes_s"] + 0.02  # rounding
    assert t["simulator_step_ms"]["p50"] <= t["step_ms"]["p50"]
    refused = subprocess.run(
        [CLI, "eval-libero", "--workers", "2", "--path", "ros", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "--workers: parallel episodes run in-process" in refused.stderr


def test_wall_clock_mode_counts_misses_and_overruns(tmp_path, server):
    """ROS path in real time: the CPU simulator cannot keep 20 Hz (overruns); every step offers an
    observation, and misses are counted by the same definition as the node's."""
    run = subprocess.run(
        [
            CLI,
            "eval-libero",
            "--path",
            "ros",
            "--mode",
            "wall_clock",
            "--suite",
            SUITE,
            "--tasks",
            "0",
            "--max-steps",
            "20",
            "--settle-steps",
            "1",
            "--endpoint",
            server.endpoint,
            "--out",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ROS_DOMAIN_ID": "202"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["path"] == "ros wall-clock" and summary["episodes"] == 1
    episode = json.loads((tmp_path / "results.json").read_text())["episodes"][0]
    assert episode["steps"] == 20 and len(episode["success_per_step"]) == 20
    # an observation every step (plus the first): each answered, or counted as missed, or superseded
    assert 1 <= summary["chunks"] <= 21 and summary["deadline_misses"] <= 20
    node = episode["policy_diagnostics"]
    assert int(node["observations"]) >= summary["chunks"]  # the node saw at least what came back


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "99"], "--tasks: [99] out of range 0..9 for libero_spatial"),
        (["--tasks", "0", "--trials", "51"], "--trials: 51, but libero_spatial has 50 init states"),
        (["--endpoint", "tcp://127.0.0.1:1"], "--endpoint: no sim server answered at tcp://127.0.0.1:1"),
    ],
)
def test_sim_mistakes_are_named_before_the_model_loads(server, tmp_path, args, message):
    """A task the suite lacks, more trials than a task has init states, or an endpoint where no server
    listens: exit 2 naming the option, found on first contact with the server (the model is not built,
    no episode runs)."""
    endpoint = [] if "--endpoint" in args else ["--endpoint", server.endpoint]
    (tmp_path / "report.md").write_text("an earlier run's")  # a refused command leaves it alone
    run = subprocess.run(
        [CLI, "eval-libero", *endpoint, *args, "--max-steps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "loading" not in run.stderr  # refused before the model was built
    assert (tmp_path / "report.md").read_text() == "an earlier run's"


def test_a_sim_server_stops_when_its_parent_is_gone():
    """Started with --parent-pid of a process that is not (or no longer) its parent, as when a Ray actor
    that started it was killed: it stops on its own rather than living on."""
    from vla_runtime.sim.launcher import free_endpoint, libero_python

    proc = subprocess.run(
        [str(libero_python()), "-m", "vla_runtime.sim.server", "--endpoint", free_endpoint()]
        + ["--parent-pid", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "the parent process 1 is gone; stopping" in proc.stderr, proc.stderr[
        -2000:
    ]
