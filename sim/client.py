"""Client side of the sim protocol (ZeroMQ REQ), with a timeout and reconnect per request."""

from __future__ import annotations

from collections.abc import Callable

import zmq

from . import protocol

CHECK_MS = 1000  # how often a wait for a reply asks whether the server's process is still there


class SimError(RuntimeError):
    """The server answered with an error (the message names the field)."""


class SimServerFailed(RuntimeError):
    """The sim server's process exited (before it answered, or while a request waited); the message
    carries its log's last line."""


class SimClient:
    def __init__(
        self,
        endpoint: str = protocol.DEFAULT_ENDPOINT,
        timeout_s: float = 120.0,
        server_gone: Callable[[], str | None] | None = None,
    ):
        """`server_gone`: where the server is a process of ours, why it is gone (None while it runs),
        asked each second of a wait, so a request to a dead server fails at once, not at the timeout."""
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.server_gone = server_gone
        self._context = zmq.Context.instance()
        self._socket = None
        self._renders_on_request = True  # False once the server says it does not know `render`
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.REQ)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)

    def call_raw(self, payload: bytes, timeout_s: float | None = None) -> dict:
        timeout_ms = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        self._socket.send(payload)
        waited_ms = 0
        while not self._socket.poll(min(CHECK_MS, timeout_ms - waited_ms)):
            waited_ms += CHECK_MS
            gone = self.server_gone() if self.server_gone is not None else None
            if gone is not None or waited_ms >= timeout_ms:
                self._connect()  # a REQ socket that missed its reply cannot send again: start over
                if gone is not None:
                    raise SimServerFailed(gone)
                raise TimeoutError(
                    f"sim server at {self.endpoint} did not answer in {timeout_ms / 1000:.0f} s"
                )
        return protocol.decode(self._socket.recv())

    def call(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        reply = self.call_raw(protocol.request(op, **fields), timeout_s)
        if not reply.get("ok"):
            raise SimError(reply.get("error", "unknown error"))
        return reply

    def suites(self, timeout_s: float | None = None) -> list[str]:
        return self.call("list_suites", timeout_s)["suites"]

    def tasks(self, suite: str) -> list[dict]:
        return self.call("list_tasks", suite=suite)["tasks"]

    def reset(
        self, suite: str, task: int, init_state: int = 0, seed: int = 7, settle_steps: int = 10
    ) -> dict:
        return self.call(
            "reset", suite=suite, task=task, init_state=init_state, seed=seed, settle_steps=settle_steps
        )["observation"]

    def step(self, action, render: bool = True) -> dict:
        """One control step; render=False: the observation without the cameras. A server of an earlier
        version refuses the field (before stepping): then every step is sent without it, rendered."""
        if not render and self._renders_on_request:
            try:
                return self.call("step", action=action, render=False)
            except SimError as err:
                if not str(err).startswith("render: unknown field"):
                    raise
                self._renders_on_request = False
        return self.call("step", action=action)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
