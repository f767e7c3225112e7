"""Start the LIBERO sim server in its own virtual environment, as a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from .client import SimClient, SimServerFailed

ENV_VAR = "VLA_LIBERO_PYTHON"
# By design a simulator is one single-threaded process, one per CPU when several run: numpy's BLAS and
# OpenMP pools, sized to every CPU by default, would otherwise contend with the other simulators for
# robosuite's small matrices (an A/B on 16 CPUs did not show a clear gain: docs/many_robots.md). One
# thread each unless the environment sets them.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def libero_python() -> Path:
    """LIBERO's interpreter: $VLA_LIBERO_PYTHON, else .venv-libero/bin/python under the current directory."""
    path = Path(os.environ.get(ENV_VAR) or Path.cwd() / ".venv-libero" / "bin" / "python")
    if not path.exists():
        raise ValueError(
            f"{ENV_VAR}: no LIBERO environment at {path}; create it with `make libero` "
            f"(sim/requirements-libero.txt) or point {ENV_VAR} at its python"
        )
    return path


class ActorFailed(RuntimeError):
    """A simulator or policy server started as a Ray actor (sim/distributed.py) failed or never started;
    the message carries its own error."""


def last_line(log_path) -> str:
    """A log's last non-empty line (what a process said as it died), or why there is none."""
    if log_path is None:
        return "no log kept"
    try:
        lines = [line for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError as err:
        return f"log unreadable ({err})"
    return lines[-1].strip() if lines else "its log is empty"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's limit), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class SimServerProcess:
    """A LIBERO sim server in its own process. By default the constructor returns once the server
    answers; with `wait=False` it returns at once and `wait_ready()` waits (`start_sim_servers`)."""

    def __init__(
        self,
        endpoint: str | None = None,
        log_path: Path | None = None,
        timeout_s: float = 120.0,
        wait: bool = True,
    ):
        self.endpoint = endpoint or free_endpoint()
        self.log_path = log_path
        self.timeout_s = timeout_s
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        env = {**SINGLE_THREADED, **os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("MUJOCO_GL", "egl")
        try:
            self.proc = subprocess.Popen(
                [str(libero_python()), "-m", "vla_runtime.sim.server", "--endpoint", self.endpoint]
                + ["--parent-pid", str(os.getpid())],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            if log_path:
                log.close()  # the child has its own copy
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until the server answers (it imports LIBERO first: seconds); stopped and raised on failure."""
        client = SimClient(self.endpoint, timeout_s=5.0)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                gone = self.exit_reason()
                if gone is not None:
                    raise SimServerFailed(
                        f"{gone} before answering (its Python: {libero_python()}, {ENV_VAR} chooses another)"
                    )
                try:
                    client.suites()
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise
        finally:
            client.close()

    def exit_reason(self) -> str | None:
        """Why the server's process is gone (its exit code, its log's last line), or None while it runs."""
        if self.proc.poll() is None:
            return None
        said = last_line(self.log_path)
        return f"sim server exited with {self.proc.returncode}: {said} (log: {self.log_path})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_sim_servers(log_paths: list[Path]) -> list[SimServerProcess]:
    """One sim server per log path, started together, as each imports LIBERO for seconds first (their
    effect on the start-up was not shown: measured once, on another machine than the run before).
    Returns when all answer; if one fails, all are stopped."""
    servers: list[SimServerProcess] = []
    try:
        for path in log_paths:
            servers.append(SimServerProcess(log_path=path, wait=False))
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
