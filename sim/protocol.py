"""The sim protocol: msgpack maps over ZeroMQ REQ/REP, numpy arrays as raw buffers, no pickle.

Every message carries `v` (the protocol version). Requests name an `op`; replies carry `ok` and either
the op's fields or an `error` that names the offending field. This module needs only numpy and msgpack,
so both sides (the runtime's environment and LIBERO's) import it.

    list_suites                         -> suites: [str]
    list_tasks  suite                   -> tasks: [{index, name, instruction, init_states}]
    reset       suite, task, init_state, seed, settle_steps -> observation
    step        action (float [7]), render (bool, default true) -> observation, reward, done, success, sim_ms
    close                               -> {}

observation = {agentview [256, 256, 3] uint8, wrist [256, 256, 3] uint8 (both upright), eef_pos [3],
               eef_axis_angle [3], gripper_qpos [2], state [8] (the three concatenated, as openpi's
               LIBERO example feeds pi0), instruction: str, step: int}; a step with render false leaves
               the cameras out (not rendered: a client that will not look at them saves their cost)

sim_ms: the simulator's own time for the step (in the server, around LIBERO's step, its success check and
the observation's arrays; not the decoding and encoding), so a client can tell it from the round trip.
"""

from __future__ import annotations

import msgpack
import numpy as np

VERSION = 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # localhost only unless the user asks otherwise
ARRAY_DTYPES = ("uint8", "float32", "float64", "int64", "bool")
ACTION_DIM = 7

# op -> {field: (type, required)}
REQUEST_FIELDS: dict[str, dict[str, tuple[type | tuple, bool]]] = {
    "list_suites": {},
    "list_tasks": {"suite": (str, True)},
    "reset": {
        "suite": (str, True),
        "task": (int, True),
        "init_state": (int, False),
        "seed": (int, False),
        "settle_steps": (int, False),
    },
    "step": {"action": (np.ndarray, True), "render": (bool, False)},
    "close": {},
}


class ProtocolError(ValueError):
    """A malformed message; the text names the field."""


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in ARRAY_DTYPES:
            raise TypeError(f"array dtype {obj.dtype} is not allowed on the wire")
        return {
            "__nd__": True,
            "dtype": obj.dtype.name,
            "shape": list(obj.shape),
            "data": np.ascontiguousarray(obj).tobytes(),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _unpack_hook(obj):
    if obj.get("__nd__"):
        dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
        if dtype not in ARRAY_DTYPES:
            raise ProtocolError(f"array dtype: {dtype!r} is not one of {ARRAY_DTYPES}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ProtocolError(f"array shape: {shape!r} is not a list of sizes")
        if (
            not isinstance(data, bytes | bytearray)
            or len(data) != int(np.prod(shape)) * np.dtype(dtype).itemsize
        ):
            raise ProtocolError(
                f"array data: {len(data) if isinstance(data, bytes | bytearray) else data!r} "
                f"bytes do not fit shape {shape} of {dtype}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return obj


def encode(message: dict) -> bytes:
    return msgpack.packb({"v": VERSION, **message}, default=_pack_default, use_bin_type=True)


def decode(payload: bytes) -> dict:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message: {len(payload)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(payload, object_hook=_unpack_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure is the sender's malformed message
        raise ProtocolError(f"message: not valid msgpack ({type(err).__name__}: {err})") from None
    if not isinstance(message, dict):
        raise ProtocolError("message: must be a map")
    if message.get("v") != VERSION:
        raise ProtocolError(f"v: protocol version {message.get('v')!r} is not {VERSION}")
    return message


def check_request(message: dict) -> tuple[str, dict]:
    """Validate a decoded request -> (op, fields)."""
    op = message.get("op")
    if op not in REQUEST_FIELDS:
        raise ProtocolError(f"op: {op!r} is not one of {sorted(REQUEST_FIELDS)}")
    fields = {}
    for name, (kind, required) in REQUEST_FIELDS[op].items():
        if name not in message:
            if required:
                raise ProtocolError(f"{name}: missing (required by {op})")
            continue
        value = message[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ProtocolError(f"{name}: must be an integer, got {type(value).__name__}")
        if kind is not int and not isinstance(value, kind):
            raise ProtocolError(
                f"{name}: must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
            )
        fields[name] = value
    unknown = set(message) - set(REQUEST_FIELDS[op]) - {"v", "op"}
    if unknown:
        raise ProtocolError(f"{sorted(unknown)[0]}: unknown field for {op}")
    if op == "step":
        action = fields["action"]
        if action.shape != (ACTION_DIM,) or action.dtype.kind != "f":
            raise ProtocolError(
                f"action: must be float [{ACTION_DIM}], got {action.dtype} {list(action.shape)}"
            )
        if not np.all(np.isfinite(action)):
            raise ProtocolError("action: contains NaN or inf")
    if op == "reset" and not 0 <= fields.get("seed", 0) < 2**32:  # NumPy's seeds; before any rebuild
        raise ProtocolError(f"seed: must be in 0..{2**32 - 1}, got {fields['seed']}")
    return op, fields


def request(op: str, **fields) -> bytes:
    return encode({"op": op, **fields})


def reply_ok(**fields) -> bytes:
    return encode({"ok": True, **fields})


def reply_error(error: str) -> bytes:
    return encode({"ok": False, "error": error})
