"""The LIBERO sim server: `python -m vla_runtime.sim.server [--endpoint tcp://127.0.0.1:5555]`.

Runs in LIBERO's own virtual environment (see sim/requirements-libero.txt), headless with
MUJOCO_GL=egl. One request at a time (ZeroMQ REP). A malformed or out-of-range request gets an error
reply naming the field and the server goes on; a client that vanishes mid-episode leaves nothing
behind but the episode, which the next reset replaces.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import zmq

from . import protocol

log = logging.getLogger("vla_runtime.sim.server")


def elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def handle(sim, payload: bytes) -> bytes:
    try:
        op, fields = protocol.check_request(protocol.decode(payload))
        if op == "list_suites":
            return protocol.reply_ok(suites=sim.suites())
        if op == "list_tasks":
            return protocol.reply_ok(tasks=sim.tasks(fields["suite"]))
        if op == "reset":
            observation = sim.reset(
                fields["suite"],
                fields["task"],
                fields.get("init_state", 0),
                fields.get("seed", 7),
                fields.get("settle_steps", 10),
            )
            return protocol.reply_ok(observation=observation)
        if op == "step":
            started = time.perf_counter()
            observation, reward, done, success = sim.step(fields["action"], fields.get("render", True))
            return protocol.reply_ok(
                observation=observation, reward=reward, done=done, success=success, sim_ms=elapsed_ms(started)
            )
        sim.close()
        return protocol.reply_ok()
    except ValueError as err:  # ProtocolError included: the request's fault, named
        return protocol.reply_error(str(err))
    except Exception as err:  # noqa: BLE001 - the simulator failed; say so and keep serving
        log.exception("request failed")
        return protocol.reply_error(f"simulator: {type(err).__name__}: {err}")


def serve(endpoint: str, sim=None, parent_pid: int | None = None) -> None:
    """Answer requests until interrupted, or (with `parent_pid`) until that process is gone: a sim
    server started by a process that was killed (a Ray actor ended by force) does not outlive it."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.REP)
    # Messages up to 8x the protocol limit are read and answered with an error naming the size; beyond
    # that ZeroMQ drops the sender's connection, so no client can make the server hold unbounded memory.
    socket.setsockopt(zmq.MAXMSGSIZE, 8 * protocol.MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)  # first: an endpoint in use or malformed is said before LIBERO loads (seconds)
    if sim is None:
        from .libero_env import LiberoSim  # noqa: PLC0415

        sim = LiberoSim()
    log.info("LIBERO sim server on %s", endpoint)
    print(f"sim server ready on {endpoint}", flush=True)
    while True:
        if not socket.poll(1000):
            if parent_pid is not None and os.getppid() != parent_pid:
                log.info("the parent process %d is gone; stopping", parent_pid)
                return
            continue
        frames = socket.recv_multipart()
        if len(frames) != 1:  # a request is one msgpack frame; REP must still answer this one
            reply = protocol.reply_error(f"request: expected one message frame, got {len(frames)}")
        else:
            reply = handle(sim, frames[0])
        try:
            socket.send(reply)
        except zmq.ZMQError as err:  # the client went away meanwhile: serve the next one
            log.warning("reply not sent: %s", err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--endpoint",
        default=protocol.DEFAULT_ENDPOINT,
        help="ZeroMQ endpoint to bind (default: localhost only)",
    )
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="stop when this process is gone (set by the launcher)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        serve(args.endpoint, parent_pid=args.parent_pid)
    except KeyboardInterrupt:
        pass
    except zmq.ZMQError as err:  # the endpoint: in use, or not one ZeroMQ can bind
        print(f"sim server: error: --endpoint {args.endpoint}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
