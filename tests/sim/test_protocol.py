"""The sim protocol: every message type round-trips; malformed messages are named errors."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from vla_runtime.sim import protocol
from vla_runtime.sim.protocol import ProtocolError, check_request, decode, encode


def observation(rng):
    return {
        "agentview": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "eef_pos": rng.normal(size=3).astype(np.float32),
        "eef_axis_angle": rng.normal(size=3).astype(np.float32),
        "gripper_qpos": rng.normal(size=2).astype(np.float32),
        "state": rng.normal(size=8).astype(np.float32),
        "instruction": "pick up the bowl",
        "step": 3,
    }


@pytest.mark.parametrize(
    "op, fields",
    [
        ("list_suites", {}),
        ("list_tasks", {"suite": "libero_spatial"}),
        ("reset", {"suite": "libero_spatial", "task": 2, "init_state": 1, "seed": 7, "settle_steps": 0}),
        ("step", {"action": np.linspace(-1, 1, 7).astype(np.float32)}),
        ("close", {}),
    ],
)
def test_requests_round_trip(op, fields):
    got_op, got = check_request(decode(protocol.request(op, **fields)))
    assert got_op == op and got.keys() == fields.keys()
    for k, v in fields.items():
        np.testing.assert_array_equal(got[k], v)


def test_replies_round_trip(rng):
    obs = observation(rng)
    for reply in (
        {"suites": ["libero_spatial", "libero_10"]},
        {"tasks": [{"index": 0, "name": "t", "instruction": "do", "init_states": 50}]},
        {"observation": obs},
        {"observation": obs, "reward": 0.0, "done": False, "success": True},
    ):
        back = decode(protocol.reply_ok(**reply))
        assert back["ok"] is True and back["v"] == protocol.VERSION
        for k, v in reply.items():
            if k == "observation":
                for name, value in obs.items():
                    np.testing.assert_array_equal(back[k][name], value)
                    if isinstance(value, np.ndarray):
                        assert back[k][name].dtype == value.dtype and back[k][name].flags.writeable
            else:
                assert back[k] == v
    err = decode(protocol.reply_error("task: 99 out of range"))
    assert err == {"v": protocol.VERSION, "ok": False, "error": "task: 99 out of range"}


def raw(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def nd(dtype, shape, nbytes):
    return {"__nd__": True, "dtype": dtype, "shape": shape, "data": bytes(nbytes)}


MALFORMED = [
    (raw({"v": 99, "op": "list_suites"}), "v: protocol version 99"),
    (raw({"op": "list_suites"}), "v: protocol version None"),
    (raw({"v": 1, "op": "fly"}), "op: 'fly'"),
    (raw({"v": 1, "op": "reset", "task": 0}), "suite: missing"),
    (raw({"v": 1, "op": "reset", "suite": "s", "task": "0"}), "task: must be an integer"),
    (raw({"v": 1, "op": "reset", "suite": "s", "task": True}), "task: must be an integer"),
    (raw({"v": 1, "op": "reset", "suite": "s", "task": 0, "seed": -1}), "seed: must be in 0..4294967295"),
    (raw({"v": 1, "op": "reset", "suite": "s", "task": 0, "seed": 2**63}), "seed: must be in 0..4294967295"),
    (raw({"v": 1, "op": "list_tasks", "suite": "s", "extra": 1}), "extra: unknown field"),
    (raw({"v": 1, "op": "step"}), "action: missing"),
    (raw({"v": 1, "op": "step", "action": [0.0] * 7}), "action: must be ndarray"),
    (raw({"v": 1, "op": "step", "action": nd("int64", [7], 56)}), "action: must be float"),
    (raw({"v": 1, "op": "step", "action": nd("float32", [6], 24)}), "action: must be float"),
    (raw({"v": 1, "op": "step", "action": nd("float32", [7], 20)}), "array data"),
    (raw({"v": 1, "op": "step", "action": nd("object", [7], 56)}), "array dtype"),
    (raw({"v": 1, "op": "step", "action": nd("float32", [-7], 28)}), "array shape"),
    (b"\xc1 not msgpack", "message: not valid msgpack"),
    (raw([1, 2, 3]), "message: must be a map"),
    (b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1), "exceeds the limit"),
]


@pytest.mark.parametrize("payload, error", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_messages_name_the_field(payload, error):
    with pytest.raises(ProtocolError, match=error.replace("(", r"\(")):
        check_request(decode(payload))


def test_non_finite_action_and_no_pickle():
    bad = np.array([0, 0, 0, 0, 0, 0, np.nan], dtype=np.float32)
    with pytest.raises(ProtocolError, match="action: contains NaN"):
        check_request(decode(protocol.request("step", action=bad)))
    with pytest.raises(TypeError):
        encode({"x": object()})  # arbitrary objects are never serialised


class StepOnly:
    """A simulator stub for the server: records each step's render flag."""

    def __init__(self, rng):
        self.rng, self.renders = rng, []

    def step(self, action, render=True):
        self.renders.append(render)
        obs = observation(self.rng)
        if not render:
            del obs["agentview"], obs["wrist"]
        return obs, 0.0, False, False


def test_a_step_without_cameras_and_a_server_that_does_not_know_render(rng, monkeypatch):
    """render false leaves the cameras out; a server of an earlier version refuses the field before
    stepping, and the client then sends every step without it (rendered), stepping once each time."""
    import threading

    from vla_runtime.sim.client import SimClient
    from vla_runtime.sim.launcher import free_endpoint
    from vla_runtime.sim.server import serve

    sim, endpoint = StepOnly(rng), free_endpoint()
    threading.Thread(target=serve, args=(endpoint, sim), daemon=True).start()
    client = SimClient(endpoint, timeout_s=10)
    action = np.zeros(7, np.float32)
    assert "agentview" not in client.step(action, render=False)["observation"]
    assert "agentview" in client.step(action)["observation"] and sim.renders == [False, True]
    monkeypatch.setitem(protocol.REQUEST_FIELDS, "step", {"action": (np.ndarray, True)})  # the old server
    assert "agentview" in client.step(action, render=False)["observation"]
    assert "agentview" in client.step(action, render=False)["observation"]
    assert sim.renders == [False, True, True, True]  # one step per call, the refused one not stepped
    client.close()


def test_a_request_of_several_frames_is_refused_and_the_server_keeps_serving(rng):
    """A request is one msgpack frame; one sent in two (another ZeroMQ client's mistake) gets an error
    reply naming it, and the server answers the next request (it used to die replying)."""
    import threading

    import zmq
    from vla_runtime.sim.client import SimClient
    from vla_runtime.sim.launcher import free_endpoint
    from vla_runtime.sim.server import serve

    sim, endpoint = StepOnly(rng), free_endpoint()
    threading.Thread(target=serve, args=(endpoint, sim), daemon=True).start()
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    socket.send_multipart([protocol.request("step", action=np.zeros(7, np.float32)), b"more"])
    assert socket.poll(10_000), "the server did not answer"
    reply = protocol.decode(socket.recv())
    assert not reply["ok"] and "one message frame, got 2" in reply["error"]
    socket.close()
    client = SimClient(endpoint, timeout_s=10)
    assert "agentview" in client.step(np.zeros(7, np.float32))["observation"]
    client.close()


def test_a_request_to_a_server_whose_process_is_gone_fails_with_why():
    """SimClient's `server_gone` (the launcher's exit_reason) is asked while a request waits: a server
    process that died mid-run fails the request with its reason, not a timeout minutes later."""
    from vla_runtime.sim.client import SimClient, SimServerFailed
    from vla_runtime.sim.launcher import free_endpoint

    asked = []

    def server_gone():  # alive for the first check, then gone
        asked.append(1)
        return None if len(asked) < 2 else "sim server exited with -9: (log: sim_server.log)"

    client = SimClient(free_endpoint(), timeout_s=60, server_gone=server_gone)  # nothing listens there
    with pytest.raises(SimServerFailed, match="exited with -9"):
        client.suites()
    assert len(asked) == 2
    client.close()


@pytest.mark.parametrize("endpoint", ["notanendpoint", "in use"])
def test_a_sim_server_given_an_endpoint_it_cannot_bind_says_so_and_exits_2(endpoint, capsys):
    """Before LIBERO loads (this Python has none): a malformed endpoint, or one another socket holds."""
    import zmq
    from vla_runtime.sim.launcher import free_endpoint
    from vla_runtime.sim.server import main

    holder = None
    if endpoint == "in use":
        endpoint = free_endpoint()
        holder = zmq.Context.instance().socket(zmq.REP)
        holder.setsockopt(zmq.LINGER, 0)
        holder.bind(endpoint)
    try:
        assert main(["--endpoint", endpoint]) == 2
    finally:
        if holder is not None:
            holder.close()
    assert f"sim server: error: --endpoint {endpoint}" in capsys.readouterr().err
