"""`vla-runtime`: serve pi0 / pi0.5 policies. Run a closed-loop LIBERO demo (demo, eval-libero), the ROS 2
policy node (node), a few frames (infer), or check a checkpoint and a precision mode (inspect, accuracy,
calibrate, profile). Bad input or configuration exits with code 2 and names the option."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
SIM_CONTACT_TIMEOUT_S = 10.0  # a sim server given by --endpoint must answer its first request within this


# ---------------------------------------------------------------------- argument types (checked once, here)
def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def task_list(text: str) -> list[int]:
    try:
        tasks = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of task indices") from None
    if any(t < 0 for t in tasks):
        raise argparse.ArgumentTypeError(f"task indices start at 0, got {text}")
    if len(set(tasks)) != len(tasks):  # an episode is named by (task, trial): more trials, not repeats
        raise argparse.ArgumentTypeError(f"a task index twice in {text}; use --trials for more episodes")
    return tasks


def zmq_endpoint(text: str) -> str:
    if not re.fullmatch(r"tcp://[^\s:/]+:\d{1,5}|ipc://\S+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)")
    return text


def output_dir(path: str, option: str) -> Path:
    """Create an output directory before any work, so a bad path costs nothing."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option}: cannot create {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"{option}: {out} is not writable")
    return out


def say(text: str) -> None:
    """Progress on stderr (stdout stays the result)."""
    print(text, file=sys.stderr, flush=True)


def cmd_info(args) -> int:
    import torch

    from .graphs.config import PRESETS

    devices = ["cpu"] + [
        f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
    ]
    info = {
        "vla_runtime": __import__("vla_runtime").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "presets": {
            name: {
                "pi05": c.pi05,
                "cameras": list(c.camera_names),
                "image_size": c.vision.image_size,
                "prefix_len": c.prefix_len,
                "action_horizon": c.action_horizon,
                "action_dim": c.action_dim,
                "layers": c.prefix_lm.depth,
            }
            for name, c in PRESETS.items()
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"vla_runtime {info['vla_runtime']}  python {info['python']}  torch {info['torch']}")
        print("devices: " + ", ".join(devices))
        for name, p in info["presets"].items():
            print(
                f"  {name:10s} pi05={p['pi05']!s:5s} cameras={len(p['cameras'])} image={p['image_size']} "
                f"prefix_len={p['prefix_len']} horizon={p['action_horizon']} layers={p['layers']}"
            )
    return 0


def runtime_config_from_args(args):
    """The model options (one per setting of runtime/settings.py) as a RuntimeConfig. Where the device is
    not given, demo and eval-libero take CUDA when there is one, with pi05 and bf16 there."""
    from .runtime.config import RuntimeConfig
    from .runtime.settings import config_values

    values = config_values(lambda name: getattr(args, name))
    if values["device"] is None:
        import torch

        values["device"] = "cuda" if args.defaults_by_device and torch.cuda.is_available() else "cpu"
    if values["preset"] is None and values["checkpoint"] is None and args.defaults_by_device:
        values["preset"] = "pi05" if values["device"].startswith("cuda") else "pi05_tiny"
    if values["precision"] is None:
        values["precision"] = "bf16" if values["device"] != "cpu" else "float32"
    if values["device"].startswith("cuda"):  # here, before a command starts servers or a node process
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device: {values['device']} requested but CUDA is not available")
    return RuntimeConfig(**values)


def refuse_executor_settings(args) -> None:
    """infer runs the eager reference: an executor's setting given to it (EXECUTOR_ONLY) would be dropped
    without a word, so it is refused, named."""
    from .runtime.settings import EXECUTOR_ONLY, SETTINGS

    defaults = build_parser().parse_args(["infer"])
    for s in SETTINGS:
        if s.name in EXECUTOR_ONLY and getattr(args, s.name) != getattr(defaults, s.name):
            raise ValueError(
                f"{s.flag}: infer runs the eager reference, which does not read this setting of the "
                "executor; `profile` and `eval-libero` run the executor"
            )


def cmd_infer(args) -> int:
    from .runtime.reference import EagerPolicy
    from .runtime.synthetic import synthetic_observation

    refuse_executor_settings(args)
    config = runtime_config_from_args(args)
    policy = EagerPolicy(config)
    rng = np.random.default_rng(args.seed)
    chunks = [policy.infer(synthetic_observation(config, rng)) for _ in range(args.frames)]
    last = chunks[-1]
    # The first frame includes one-time start-up work; report the median of the rest when there are any.
    timed = chunks[1:] or chunks
    timings = {k: float(np.median([c.timings_ms[k] for c in timed])) for k in last.timings_ms}
    result = {
        **last.summary(),
        "timings_ms": {k: round(v, 3) for k, v in timings.items()},
        "frames_timed": len(timed),
        "device": config.device,
        "precision": config.precision,
        "actions": np.round(last.actions, 5).tolist(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    weights = (
        "RANDOM WEIGHTS (no checkpoint given): the actions are meaningless"
        if last.random_weights
        else f"checkpoint {config.checkpoint}"
    )
    print(
        f"model {last.model_id} on {config.device} ({config.precision}), "
        f"{last.steps} denoising steps; {weights}"
    )
    a = last.actions
    print(
        f"action chunk: {a.shape[0]} x {a.shape[1]}  mean {a.mean():+.4f}  std {a.std():.4f}  "
        f"range [{a.min():+.4f}, {a.max():+.4f}]"
    )
    print(f"first action: {np.array2string(a[0], precision=4, suppress_small=True)}")
    after_first = " after the first" if len(timed) < len(chunks) else ""
    print(f"per-stage time (ms, median of {len(timed)} frame(s){after_first}):")
    for stage, value in timings.items():
        print(f"  {stage:9s} {value:9.3f}")
    return 0


def default_params_file() -> str:
    from importlib import resources

    return str(resources.files("vla_runtime.launch") / "config" / "policy.yaml")


def node_ros_args(args) -> list[str]:
    """The node's ROS arguments from its command-line shortcuts: the params file, then overrides."""
    argv = ["--ros-args", "--params-file", args.params_file or default_params_file()]
    for name in ("preset", "checkpoint", "device", "precision"):
        value = getattr(args, name)
        if (
            value is not None
        ):  # in JSON, which rcl reads as YAML: a path "2024", "yes", "[x]" or "a #1" stays one
            argv += ["-p", f"{name}:={json.dumps(value)}"]
    if args.rate_hz is not None:
        argv += ["-p", f"rate_hz:={float(args.rate_hz)}"]
    return argv


def cmd_node(args, ros_args: list[str]) -> int:
    """The same node `ros2 launch vla_runtime policy.launch.py` starts, with the same YAML."""
    from .nodes.policy_node import main as node_main

    return node_main(["vla-runtime-node", *node_ros_args(args), *ros_args])


def cmd_fleet(args, ros_args: list[str]) -> int:
    """A policy node per robot namespace in one process, one batched server below them (nodes/fleet.py)."""
    from .nodes.fleet import main as fleet_main

    return fleet_main(args.namespaces, [*node_ros_args(args), *ros_args])


def cmd_eval_libero(args) -> int:
    """Closed-loop LIBERO episodes: in-process (the runtime talks to the sim server) or through ROS; the
    same episode loop, latency and miss definitions either way."""
    from .sim.launcher import SimServerProcess

    config = runtime_config_from_args(args)
    out = output_dir(args.out, "--out")
    check_replanning(args, config)
    if args.record:  # before a server starts or an earlier report is removed
        from .runtime.recording import refuse_existing_recording

        refuse_existing_recording(args.record)
    if args.servers > 1 and args.ray is None:
        raise ValueError("--servers: several policy servers run as Ray actors; add --ray")
    if args.workers > 1 or args.ray is not None:
        if args.path == "ros" or args.mode != "lockstep" or args.endpoint or args.record:
            flag = "--ray" if args.ray is not None else "--workers"
            raise ValueError(
                f"{flag}: parallel episodes run in-process and in lockstep, each worker with a sim server "
                "of its own (no --path ros, --mode wall_clock, --endpoint or --record)"
            )
        if config.adaptive_steps:
            raise ValueError("--adaptive-steps: the workers of one server share its steps")
        if args.ray is not None:
            return cmd_eval_libero_ray(args, config, out)
        return cmd_eval_libero_parallel(args, config, out)
    if args.endpoint is None:
        say("starting the LIBERO simulation server ...")
    server = None if args.endpoint else SimServerProcess(log_path=out / "sim_server.log")
    try:
        episodes, identity, seconds = run_libero(
            args, config, args.endpoint or server.endpoint, args.tasks, out, server
        )
    finally:
        if server is not None:
            server.stop()
    return report_libero(args, config, out, episodes, identity, seconds)


def cmd_eval_libero_parallel(args, config, out) -> int:
    """`--workers N`: N sim servers, one batched policy server; each worker a robot of it."""
    from .runtime.buffers import largest_batch
    from .runtime.executor import PipelinedExecutor
    from .runtime.server import PolicyServer
    from .sim.client import SimClient
    from .sim.evaluate import EnvironmentBuilds, deal_episodes, evaluate_parallel
    from .sim.launcher import start_sim_servers

    check_workers_fit_here(args.workers)
    say(f"starting {args.workers} LIBERO simulation servers ...")
    sims = start_sim_servers([out / f"sim_server_{w}.log" for w in range(args.workers)])
    clients = []
    try:
        for sim in sims:  # one by one: those made are closed below if one fails
            clients.append(SimClient(sim.endpoint, server_gone=sim.exit_reason))
        check_sim_request(clients[0], sims[0].endpoint, args.suite, args.tasks, args.trials)
        clear_earlier_report(out)
        tasks = args.tasks or [t["index"] for t in clients[0].tasks(args.suite)]
        config = config.replace(max_batch=largest_batch(args.workers, config.batch_profiles))
        first_episodes = [share[0] for share in deal_episodes(tasks, args.trials, args.workers) if share]
        say(f"loading {config.model_name} on {config.device} ({config.precision}, batches up to "
            f"{config.max_batch}) and capturing; the simulators build their first tasks ...")  # fmt: skip
        builds = EnvironmentBuilds([sim.endpoint for sim in sims], args.suite, first_episodes, args.seed)
        with PipelinedExecutor(config) as executor, PolicyServer(executor) as server:
            builds.wait()
            episodes, seconds = evaluate_parallel(
                clients,
                server,
                args.suite,
                tasks,
                args.trials,
                **episode_settings(args, out),
            )
            metadata = executor.metadata
    finally:
        for client in clients:
            client.close()
        for sim in sims:
            sim.stop()
    identity = {"model_id": metadata.model_id, "random_weights": metadata.random_weights}
    return report_libero(args, config, out, episodes, identity, seconds)


def check_workers_fit_here(workers: int) -> None:
    """Each worker on this machine is a simulator process: more than the CPUs this process may use only
    slow each other."""
    from .sim.launcher import usable_cpus

    if workers > usable_cpus():
        raise ValueError(f"--workers: at most the {usable_cpus()} CPUs this process may use, got {workers}")


def cmd_eval_libero_ray(args, config, out) -> int:
    """`--workers N --ray ADDRESS`: the simulators and `--servers` policy servers as Ray actors, on one
    machine or a cluster (sim/distributed.py); the same episodes and report as `--workers` alone."""
    from .runtime.buffers import largest_batch
    from .sim.evaluate import check_servers

    check_servers(args.workers, args.servers)  # before Ray starts
    per_server = -(-args.workers // args.servers)
    if args.ray == "local":  # a cluster spreads them over its nodes; a local instance has this machine
        check_workers_fit_here(args.workers)
    try:
        from .sim import distributed
    except ImportError as err:
        raise ValueError(f"--ray: Ray is not installed ({err}); pip install ray (requirements.txt)") from None
    config = config.replace(max_batch=largest_batch(per_server, config.batch_profiles))
    say(f"connecting to Ray ({args.ray}) ...")
    try:  # connecting inside: Ctrl-C while Ray starts still shuts down what it started
        try:
            distributed.connect(args.ray, args.workers, args.servers)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ValueError(f"--ray: cannot connect to {args.ray!r}: {err}") from None
        actors = f"{args.workers} simulators and {args.servers} policy servers ({config.model_name})"
        say(f"{actors} as Ray actors ...")
        episodes, seconds, identity = distributed.evaluate_ray(
            config,
            args.workers,
            args.servers,
            args.suite,
            args.tasks,
            args.trials,
            str(out),
            before_start=lambda: clear_earlier_report(out),  # once the request passed its checks
            **episode_settings(args, out),
        )
    finally:
        distributed.ray.shutdown()
    return report_libero(args, config, out, episodes, identity, seconds)


def episode_settings(args, out) -> dict:
    """The episode loop's settings from eval-libero's arguments (sim.episode.run_episode's keywords)."""
    return dict(
        max_steps=args.max_steps,
        replan_steps=args.replan_steps,
        delay_steps=args.delay_steps,
        seed=args.seed,
        settle_steps=args.settle_steps,
        video_dir=out if args.video else None,
    )


def report_libero(args, config, out, episodes, identity, seconds: float) -> int:
    from .sim.report import headline, write_report

    meta = {
        "suite": args.suite,
        "path": f"{args.path} {args.mode.replace('_', '-')}",
        **identity,
        "device": config.device,
        "denoising_steps": config.denoising_steps,
        "replan_steps": args.replan_steps,
        "handover": config.handover,
        "delay_steps": args.delay_steps,
        "workers": args.workers,
        "ray": args.ray,
        "servers": args.servers,
        "wall_s": round(seconds, 1),
        "episodes_per_hour": round(len(episodes) / seconds * 3600, 1) if seconds > 0 else None,
    }
    summary = write_report(out, episodes, meta)
    if args.json:
        print(json.dumps({**meta, **summary, "report": str(out / "report.md")}))
        return 0
    if identity["random_weights"]:
        print(
            "RANDOM WEIGHTS (no checkpoint given): the policy cannot solve tasks; "
            "success comes from LIBERO's own check"
        )
    for e in episodes:
        print(
            f"{e.suite} task {e.task} init {e.init_state}: {'SUCCESS' if e.success else 'failure'} after "
            f"{e.steps} steps ({e.path}); '{e.instruction}'"
        )
    print(f"success {summary['successes']}/{summary['episodes']}, {summary['chunks']} chunks")
    for line in headline(summary, meta["path"]):
        print(line)
    print(f"report: {out / 'report.md'}")
    if args.record:
        print(f"observations recorded to {args.record} (vla-runtime calibrate --observations {args.record})")
    return 0


def run_libero(args, config, endpoint: str, tasks, out, server=None) -> tuple[list, dict, float]:
    """The episodes over the chosen path, the served model's identity (model_id, random_weights) and the
    episodes' wall-clock seconds (the policy's start-up not included). `server`: the sim server's process
    where it is ours (a request to it fails as soon as it is gone)."""
    from .sim.client import SimClient
    from .sim.evaluate import EnvironmentBuilds, evaluate

    if args.delay_steps and (args.path == "ros" or args.mode != "lockstep"):
        raise ValueError(
            "--delay-steps: an injected delay needs --path in-process and --mode lockstep (the policy node "
            "and the wall clock measure their own delay)"
        )
    lockstep = args.mode == "lockstep"
    client = SimClient(endpoint, server_gone=server.exit_reason if server is not None else None)
    check_sim_request(client, endpoint, args.suite, tasks, args.trials)  # before the model is built
    clear_earlier_report(out)
    run = episode_settings(args, out)
    try:
        if args.path == "ros":
            from .nodes.ros_eval import RosPolicy, node_params

            say(f"starting the policy node ({config.device}) ...")
            with RosPolicy(node_params(config, args.record), lockstep, out / "policy_node.log") as link:
                episodes, seconds = evaluate(client, link, args.suite, tasks or [0], args.trials, **run)
                served = link.diagnostics()
            identity = {
                "model_id": served.get("model_id", "?"),
                "random_weights": served.get("random_weights", str(args.checkpoint is None)) == "True",
            }
            return episodes, identity, seconds
        from .runtime.executor import PipelinedExecutor
        from .sim.episode import InProcessLink

        recorder = None
        if args.record:
            from .runtime.recording import ObservationRecorder

            recorder = ObservationRecorder(args.record)
        try:
            start = time.monotonic()
            say(f"loading {config.model_name} on {config.device} ({config.precision}) and capturing ...")
            tasks = tasks or [t["index"] for t in client.tasks(args.suite)]
            # A sim server of our own builds while the model loads; one at --endpoint may be of an earlier
            # version, whose scenes an extra reset would move (docs/libero.md): left alone.
            builds = (
                None
                if args.endpoint
                else EnvironmentBuilds([endpoint], args.suite, [(tasks[0], 0)], args.seed)
            )
            with PipelinedExecutor(config) as policy:
                took = f"ready in {time.monotonic() - start:.0f} s ({policy.describe_startup()})"
                say(f"{took}: {policy.metadata.model_id}")
                if builds is not None:
                    builds.wait()
                link = InProcessLink(policy, lockstep, recorder)
                episodes, seconds = evaluate(client, link, args.suite, tasks, args.trials, **run)
                metadata = policy.metadata
        finally:
            if recorder is not None:
                recorder.close()
        identity = {"model_id": metadata.model_id, "random_weights": metadata.random_weights}
        return episodes, identity, seconds
    finally:
        client.close()


def check_replanning(args, config) -> None:
    """In lockstep, replanning and an injected delay within what a chunk offers: past it, an episode runs
    what the chunk has and the report would claim the setting. (The wall clock replans as chunks come.)"""
    if args.mode != "lockstep":
        return
    offered = config.model.chunk_length
    if args.replan_steps > offered:
        raise ValueError(
            f"--replan-steps: {args.replan_steps}, but a chunk of {config.model_name} offers {offered} "
            "actions"
        )
    # a chunk is taken up from action `delay` on (the robot went on with the previous one meanwhile), is
    # replanned `replan` actions later, and must then hold the next delay's `delay` actions
    if args.replan_steps + 2 * args.delay_steps > offered:
        raise ValueError(
            f"--delay-steps: {args.delay_steps}, but a chunk of {offered} actions taken up from action "
            f"{args.delay_steps} and replanned every {args.replan_steps} holds "
            f"{max(offered - args.delay_steps - args.replan_steps, 0)} for the next delay"
        )


def clear_earlier_report(out: Path) -> None:
    """An earlier run's report in `out` removed once this run's request has passed its checks: a run that
    then fails leaves none to be taken for its own (a refused command leaves it alone)."""
    from .sim.report import REPORT_FILES

    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)


def check_sim_request(
    client, endpoint: str, suite: str, tasks: list[int] | None, trials: int | None = None
) -> None:
    """The server answers, knows the suite and has the tasks, each with an init state per trial: a
    mistake is named before minutes of loading and episodes, not after."""
    from .sim.client import SimError
    from .sim.evaluate import check_tasks_and_trials

    try:
        known = client.suites(timeout_s=SIM_CONTACT_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(
            f"--endpoint: no sim server answered at {endpoint} within {SIM_CONTACT_TIMEOUT_S:.0f} s"
        ) from None
    if suite not in known:
        raise ValueError(f"--suite: unknown suite {suite!r}; the server has {', '.join(known)}")
    try:
        known_tasks = client.tasks(suite)
    except SimError as err:
        raise ValueError(f"--suite: {err}") from None
    check_tasks_and_trials(known_tasks, suite, tasks, trials)


def demo_chunk_length(args) -> int:
    """The actions a chunk of the demo's model offers (a checkpoint's or --n-action-steps' may be few)."""
    return runtime_config_from_args(args).model.chunk_length


def cmd_demo(args) -> int:
    """One libero_spatial episode through the ROS path (policy node + sim bridge, lockstep on sim time),
    then the same episode in-process; the two reports side by side, by the same definitions."""
    out = output_dir(args.out, "--out")
    common = dict(
        suite="libero_spatial",
        tasks=[0],
        trials=1,
        replan_steps=min(
            5, demo_chunk_length(args)
        ),  # eval-libero's default, or the whole of a shorter chunk
        delay_steps=0,
        workers=1,
        ray=None,
        servers=1,
        settle_steps=10,
        mode="lockstep",
        endpoint=None,
        json=False,
    )
    print("== through ROS: the policy node in its own process, the sim bridge publishing /clock ==")
    ros = argparse.Namespace(**{**vars(args), **common, "path": "ros", "video": True, "out": str(out)})
    status = cmd_eval_libero(ros)
    if status:
        return status
    print("\n== in-process: the same episode loop calling the policy directly ==")
    local = argparse.Namespace(
        **{
            **vars(args),
            **common,
            "path": "in-process",
            "video": False,
            "record": None,
            "out": str(out / "in-process"),
        }
    )
    status = cmd_eval_libero(local)
    if status:
        return status
    rows = []
    for name, folder in (("ROS", out), ("in-process", out / "in-process")):
        summary = json.loads((folder / "results.json").read_text())["summary"]
        age, engine = summary["chunk_age_ms"], summary["engine_total_ms"]
        rows.append(
            f"{name:11s} {age['p50']:8.1f} {age['p99']:8.1f} {engine['p50']:10.1f} "
            f"{summary['deadline_misses']:4d} / {summary['chunks']:<4d}"
        )
    print("\n== the two paths, by one definition (docs/robot.md) ==")
    print(f"{'path':11s} {'age p50':>8s} {'age p99':>8s} {'engine p50':>10s} {'misses / chunks'}")
    print("\n".join(rows))
    print(
        "age = chunk at the robot - observation taken (ms, wall clock); engine = its own submit -> chunk time"
    )
    return 0


def cmd_inspect(args) -> int:
    """What a checkpoint holds, from config.json and the tensor header (no weights are loaded)."""
    from .graphs.checkpoint import check_tensors, inspect_checkpoint
    from .graphs.normalization import load_checkpoint_norm_stats
    from .graphs.tokenizer import PromptTokenizer
    from .runtime.loading import TOKENIZER_NAMES

    info = inspect_checkpoint(args.checkpoint)
    report = info.summary()
    report["problems"] = check_tensors(info)
    try:
        stats = load_checkpoint_norm_stats(info.directory, args.robot, info.model.pi05)
        report["norm_stats"] = (
            {
                "source": stats.source,
                "state": stats.state.mode if stats.state else None,
                "actions": stats.actions.mode if stats.actions else None,
            }
            if stats
            else None
        )
    except ValueError as err:
        report["norm_stats"] = {"error": str(err)}
        report["problems"].append(str(err))  # `infer` would refuse it as well
    report["norm_stats_robots"] = (
        sorted(
            str(p.parent.relative_to(info.directory / "assets"))
            for p in (info.directory / "assets").rglob("norm_stats.json")
        )
        if (info.directory / "assets").is_dir()
        else []
    )
    tokenizer = next(
        (str(info.directory / n) for n in TOKENIZER_NAMES if (info.directory / n).is_file()), None
    )
    report["tokenizer"] = tokenizer
    if tokenizer is not None:
        try:  # a file of that name that is not SentencePiece: `infer` would refuse it
            PromptTokenizer(tokenizer, info.model.max_token_len)
        except ValueError as err:
            report["problems"].append(str(err))
    report["loadable"] = not report["problems"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["loadable"] else EXIT_BAD_INPUT
    m = info.model
    print(f"checkpoint {info.directory}")
    print(
        f"  layout        {info.layout} tensor names, {report['tensors']} tensors; "
        f"config.json: {info.dialect} dialect"
    )
    print(
        f"  model         {report['family']}: vision {_shape_name(report['vision'])}, prefix "
        f"{_shape_name(report['prefix_lm'])}, expert {_shape_name(report['expert'])}, "
        f"action_dim {m.action_dim}"
    )
    print(
        f"  horizon       {m.action_horizon} actions ({info.sources.get('action_horizon')}); "
        f"offered to the robot: {m.chunk_length}"
    )
    print(
        f"  prompt        {m.prompt_format}, padded to {m.max_token_len} tokens "
        f"(state in prompt: {info.sources.get('state_in_prompt', 'family default')})"
    )
    print(f"  cameras       {', '.join(m.camera_names)} at {m.vision.image_size}x{m.vision.image_size}")
    print(f"  steps         {m.default_steps} denoising steps by default")
    ns = report["norm_stats"]
    print(
        "  norm stats    "
        + (
            "NONE: refused unless --allow-unnormalized"
            if ns is None
            else ns.get("error") or f"{ns['source']} (state {ns['state']}, actions {ns['actions']})"
        )
    )
    print(f"  tokenizer     {tokenizer or 'none in the directory: pass --tokenizer'}")
    if info.embedding_from_lm_head:
        print("  embedding     read from the tied lm_head (no embed_tokens stored)")
    if info.unused:
        print(f"  unused        {', '.join(info.unused)} (ignored)")
    if report["problems"]:
        print(
            "  DOES NOT LOAD:\n"
            + "\n".join("    " + line for p in report["problems"] for line in p.splitlines())
        )
        return EXIT_BAD_INPUT
    flags = "" if ns else " --allow-unnormalized"
    flags += "" if tokenizer else " --tokenizer PALIGEMMA_TOKENIZER"
    print(f"  serve it      vla-runtime infer --checkpoint {Path(args.checkpoint)} --device cuda{flags}")
    return 0


def _shape_name(shape) -> str:
    return shape if isinstance(shape, str) else f"custom {shape}"


def cmd_calibrate(args) -> int:
    """FP8 activation scales from recorded observations, saved with what they were made for."""
    import torch

    from .runtime.calibration import attach_fp8, calibrate_scales, check_writable_file, save_scales
    from .runtime.loading import build_parts
    from .runtime.recording import read_observations

    # Calibration observes activations in high precision (bf16 on a GPU, float32 on the CPU); which GEMMs
    # get FP8 scales is --fp8-expert's choice.
    config = runtime_config_from_args(argparse.Namespace(**{**vars(args), "fp8_expert": False}))
    high = "bf16" if config.device.startswith("cuda") and torch.cuda.is_available() else "float32"
    config = config.replace(
        precision=high,
        fp8_expert=False,
        fp8_calibration=None,
        fp8_calibration_margin=args.fp8_calibration_margin,
    )
    check_writable_file(Path(args.out), "--out")  # before the observations are read and the model calibrated
    observations = read_observations(
        args.observations, config.model.camera_names, config.state_dim, args.max_frames
    )
    parts = build_parts(config)
    modules = attach_fp8(parts, args.fp8_expert)
    meta = calibrate_scales(
        parts,
        modules,
        observations,
        str(args.observations),
        args.fp8_expert,
        args.fp8_calibration_margin,
        config.seed,
    )
    path = save_scales(modules, args.out, meta)
    if args.json:
        print(json.dumps({"scales": str(path), **meta}))
        return 0
    print(f"FP8 scales for {len(modules)} GEMMs of {meta['model_id']} written to {path}")
    print(
        f"  from {meta['frames']} observations of {args.observations} (margin {meta['margin']}); "
        f"{meta['holdout_frames']} held out: clamped fraction {meta['clamped_fraction_holdout']}"
    )
    print(
        f"  serve with: --precision fp8{' --fp8-expert' if args.fp8_expert else ''} --fp8-calibration {path}"
    )
    return 0


def cmd_accuracy(args) -> int:
    from .runtime.accuracy import accuracy_table, format_table

    observations = None
    if args.skip_frames and not args.observations:
        raise ValueError("--skip-frames: skips recorded observations; give them with --observations")
    config = runtime_config_from_args(args)
    if args.observations:
        from .runtime.recording import read_observations

        observations = read_observations(
            args.observations, config.model.camera_names, config.state_dim, args.skip_frames + args.frames
        )[args.skip_frames :]
        if not observations:
            raise ValueError(
                f"--skip-frames: {args.observations} has no observation after the first {args.skip_frames}"
            )
    result = accuracy_table(config, frames=args.frames, observations=observations)
    print(json.dumps(result) if args.json else format_table(result))
    return 0 if result["passed"] else 1


def cmd_profile(args) -> int:
    from .runtime.profiler import format_report, profile_captured, profile_stages

    stages = (args.stage,) if args.stage else ("vision", "prefix", "denoise")
    run = profile_captured if args.captured else profile_stages
    out = output_dir(args.out, "--out")
    report = run(runtime_config_from_args(args), stages, top=args.top, out_dir=out)
    print(json.dumps(report) if args.json else format_report(report))
    say(f"traces and JSON in {args.out}")  # stderr: --json's stdout is the one object
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .sim.episode import MAX_STEPS

    parser = argparse.ArgumentParser(prog="vla-runtime", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="presets, devices, versions")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    infer = sub.add_parser(
        "infer",
        help="run the policy on synthetic frames and print the action chunk",
        description="Runs the eager reference (runtime/reference.py), the model as written: the executor's "
        "settings (pipelining, shape profiles, compile scope, device_wait, adaptive steps, ...) are refused "
        "here; `profile` and `eval-libero` run the executor. The hand-over settings act only with a previous "
        "chunk, which infer does not give. Timings are the median of the frames after the first (which "
        "includes one-time start-up work).",
    )
    add_model_args(infer)
    infer.add_argument(
        "--frames",
        type=int_at_least(1),
        default=1,
        help="frames to run; timings are the median after the first (default: 1)",
    )
    infer.add_argument("--json", action="store_true", help="print one JSON object")
    infer.set_defaults(func=cmd_infer)

    node = sub.add_parser("node", help="run the ROS 2 policy node (arguments after --ros-args go to ROS)")
    add_node_shortcuts(node)
    node.set_defaults(func=cmd_node)

    fleet = sub.add_parser(
        "fleet",
        help="a policy node per robot namespace in one process, their observations batched on one model",
    )
    fleet.add_argument(
        "--namespaces",
        required=True,
        type=lambda text: [ns.strip() for ns in text.split(",") if ns.strip()],
        help="comma-separated robot namespaces, e.g. /arm_1,/arm_2 (up to 8)",
    )
    add_node_shortcuts(fleet)
    fleet.set_defaults(func=cmd_fleet)

    acc = sub.add_parser(
        "accuracy", help="a precision mode against float32, per layer and stage, with its gates"
    )
    add_model_args(acc)
    acc.add_argument(
        "--frames",
        type=int_at_least(1),
        default=4,
        help="frames to compare (random, or the first recorded; default: 4)",
    )
    acc.add_argument(
        "--observations", default=None, help="recorded observations (MCAP) instead of random ones"
    )
    acc.add_argument(
        "--skip-frames",
        type=int_at_least(0),
        default=0,
        help="recorded observations to skip first, e.g. those --integer-calibration fitted on (default: 0)",
    )
    acc.add_argument("--json", action="store_true", help="print one JSON object")
    acc.set_defaults(func=cmd_accuracy)

    insp = sub.add_parser(
        "inspect", help="what a checkpoint holds (model, layout, prompt, statistics), no weights loaded"
    )
    insp.add_argument("checkpoint", help="checkpoint directory")
    insp.add_argument("--robot", default=None, help="which assets/<robot>/norm_stats.json to report")
    insp.add_argument("--json", action="store_true", help="print one JSON object")
    insp.set_defaults(func=cmd_inspect)

    cal = sub.add_parser("calibrate", help="FP8 activation scales from recorded observations (MCAP)")
    cal.add_argument(
        "--observations", required=True, help="MCAP recording (ros2 bag, node or eval-libero --record)"
    )
    cal.add_argument("--out", required=True, help="scales file to write (.safetensors)")
    cal.add_argument(
        "--max-frames", type=int_at_least(1), default=None, help="use at most this many observations"
    )
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_args(cal)
    cal.set_defaults(func=cmd_calibrate)

    prof = sub.add_parser(
        "profile",
        help="time per layer and per kernel of each stage (device time on CUDA, operator time on the CPU)",
    )
    add_model_args(prof)
    prof.add_argument(
        "--stage", choices=["vision", "prefix", "denoise"], default=None, help="one stage (default: all)"
    )
    prof.add_argument(
        "--top", type=int_at_least(1), default=15, help="kernels listed per stage (default: 15)"
    )
    prof.add_argument(
        "--captured",
        action="store_true",
        help="the stages as served: compiled and captured in CUDA graphs, per kernel (CUDA only)",
    )
    prof.add_argument("--out", default="out/profile", help="traces and JSON (default: out/profile)")
    prof.add_argument("--json", action="store_true", help="print one JSON object")
    prof.set_defaults(func=cmd_profile)

    ev = sub.add_parser(
        "eval-libero", help="closed-loop LIBERO evaluation (starts the sim server unless --endpoint)"
    )
    ev.add_argument(
        "--suite",
        default="libero_spatial",
        choices=sorted(MAX_STEPS),
        help="LIBERO task suite (default: libero_spatial)",
    )
    ev.add_argument(
        "--tasks",
        type=task_list,
        default=None,
        help="comma-separated task indices (default: all; ROS path: 0)",
    )
    ev.add_argument(
        "--trials", type=int_at_least(1), default=1, help="episodes per task, init states 0..N-1 (default: 1)"
    )
    ev.add_argument(
        "--max-steps",
        type=int_at_least(1),
        default=None,
        help="steps per episode (default: the suite's limit)",
    )
    ev.add_argument(
        "--replan-steps",
        type=int_at_least(1),
        default=5,
        help="actions executed from each chunk before the next observation (default: 5)",
    )
    ev.add_argument(
        "--delay-steps",
        type=int_at_least(0),
        default=0,
        help="lockstep: an injected inference delay, in actions of the old chunk executed after each "
        "observation before the new chunk takes over (see --handover; default: 0)",
    )
    ev.add_argument(
        "--settle-steps",
        type=int_at_least(0),
        default=10,
        help="still steps after reset while objects settle (default: 10)",
    )
    ev.add_argument(
        "--path",
        choices=["in-process", "ros"],
        default="in-process",
        help="in-process: the runtime calls the policy; ros: through the policy node (default: in-process)",
    )
    ev.add_argument(
        "--mode",
        choices=["lockstep", "wall_clock"],
        default="lockstep",
        help="lockstep: the simulator waits for each chunk (sim time); wall_clock: it steps in real time "
        "(default: lockstep)",
    )
    ev.add_argument(
        "--endpoint",
        type=zmq_endpoint,
        default=None,
        help="a running sim server, tcp://127.0.0.1:PORT (default: start one)",
    )
    ev.add_argument("--out", default="out/libero", help="report, results and videos (default: out/libero)")
    ev.add_argument(
        "--workers",
        type=int_at_least(1),
        default=1,
        help="simulators run in parallel, each a robot of one batched policy server (in-process lockstep; "
        "up to the CPU count; default: 1)",
    )
    ev.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the --workers simulators and the policy servers as Ray actors: `local` (a Ray instance "
        "on this machine), `auto`, or a cluster's address such as ray://HOST:10001 (default: no Ray)",
    )
    ev.add_argument(
        "--servers",
        type=int_at_least(1),
        default=1,
        help="with --ray: policy servers (one GPU each where the cluster has GPUs), the workers dealt "
        "to them in turn (default: 1)",
    )
    ev.add_argument("--video", action="store_true", help="a GIF of each episode's agent view")
    ev.add_argument("--json", action="store_true", help="print one JSON summary")
    ev.add_argument(
        "--record", default=None, help="record every observation sent to the policy to this MCAP file"
    )
    add_model_args(ev, defaults_by_device=True)
    ev.set_defaults(func=cmd_eval_libero)

    demo = sub.add_parser(
        "demo", help="one closed-loop libero_spatial episode through ROS, then in-process; both reports"
    )
    add_model_args(demo, defaults_by_device=True)
    demo.add_argument(
        "--max-steps", type=int_at_least(1), default=40, help="steps of the episode (default: 40)"
    )
    demo.add_argument("--out", default="out/demo", help="reports and the episode's GIF (default: out/demo)")
    demo.add_argument(
        "--record", default=None, help="the policy node records the observations it serves to this MCAP file"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def add_preset_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    from .graphs.config import PRESETS

    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help=help_text)


# What the command line shows as the default where it is not RuntimeConfig's (chosen when the run starts).
CLI_DEFAULTS = {
    "device": "cpu",
    "precision": "bf16 on CUDA, float32 on the CPU",
}
CLI_DEFAULTS_BY_DEVICE = {
    "device": "cuda when there is one",
    "preset": "pi05 on CUDA, pi05_tiny on the CPU; with --checkpoint, the checkpoint's model",
    "seed": "7",
}


def add_node_shortcuts(p: argparse.ArgumentParser) -> None:
    """The node's command-line shortcuts (`node`, `fleet`); every other parameter goes after --ros-args."""
    from .runtime.config import PRECISION_MODES

    p.add_argument("--params-file", default=None, help="parameters YAML (default: the packaged policy.yaml)")
    add_preset_arg(p, "model for random weights (default: the params file's)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the params file's)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the params file's)")
    p.add_argument(
        "--precision",
        default=None,
        choices=PRECISION_MODES,
        help="(default: the params file's)",
    )
    p.add_argument(
        "--rate-hz",
        default=None,
        type=positive_float,
        help="deadline watch rate (default: the params file's)",
    )


def add_model_args(p: argparse.ArgumentParser, defaults_by_device: bool = False) -> None:
    """One option per setting (runtime/settings.py), with its help, choices, range and default. With
    defaults_by_device (demo, eval-libero) the device defaults to CUDA where there is one, and the
    random-weight preset to pi05 there (pi05_tiny on the CPU)."""
    from .runtime.settings import SETTINGS

    shown = {**CLI_DEFAULTS, **(CLI_DEFAULTS_BY_DEVICE if defaults_by_device else {})}
    for s in SETTINGS:
        if s.name == "preset" and not defaults_by_device:
            shown_default = "pi05_tiny; with --checkpoint, the checkpoint's model"
        else:
            shown_default = shown.get(s.name, s.default)
        unshown = shown_default in ("", None, False) or shown_default == s.unset
        suffix = "" if unshown else f" (default: {shown_default})"
        help_text = s.help + suffix
        if s.kind is bool:
            p.add_argument(s.flag, action="store_true", help=help_text)
            continue
        if s.words is not None:
            p.add_argument(s.flag, choices=list(s.words), default="auto", help=help_text)
            continue
        kwargs = {"choices": list(s.choices)} if s.choices else {"type": setting_type(s)}
        default = None if s.name in shown or s.unset is not None else s.default
        if s.name == "seed" and defaults_by_device:
            default = 7  # openpi's LIBERO evaluation seed
        p.add_argument(s.flag, default=default, help=help_text, **kwargs)
    p.set_defaults(defaults_by_device=defaults_by_device)


def setting_type(setting):
    """An argparse type that parses the setting's kind and refuses a value out of its range."""

    def parse(text: str):
        try:
            value = setting.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {setting.kind.__name__}") from None
        reason = setting.check_set(value)
        if reason:
            raise argparse.ArgumentTypeError(f"{reason}, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = argv[argv.index("--ros-args") :] if "--ros-args" in argv else []
    argv = argv[: len(argv) - len(ros_args)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad argument (already printed): its code, also to callers
        return done.code
    except KeyboardInterrupt:  # while the parser imports torch (its first second or two)
        print("vla-runtime: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args, ros_args) if args.func in (cmd_node, cmd_fleet) else args.func(args)
    except ValueError as err:  # bad input or configuration: say what, exit 2
        print(f"vla-runtime: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("vla-runtime: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (TimeoutError, RuntimeError) as err:
        from .runtime.executor import DeviceHung
        from .runtime.policy import NonFiniteActions
        from .sim.client import SimError, SimServerFailed
        from .sim.launcher import ActorFailed

        expected = (TimeoutError, SimError, DeviceHung, ActorFailed, SimServerFailed, NonFiniteActions)
        if not isinstance(err, expected):
            raise  # a bug: its traceback is what a report needs
        print(f"vla-runtime: failed: {err}", file=sys.stderr)  # the simulator or the device, not the input
        return 1
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
