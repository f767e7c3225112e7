"""ROS message <-> numpy conversions. Each raises ValueError naming the offending field."""

from __future__ import annotations

import numpy as np

ENCODINGS = ("rgb8", "bgr8")


def stamp_to_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def seconds_to_stamp(seconds: float, stamp_type):
    """Rounded to the nanosecond; a fraction that rounds up to a whole second carries into `sec`
    (1000.9999999999991 is 1001 s, not 1000 s and 0 ns: a stamp must never go back)."""
    sec, nanosec = divmod(round(seconds * 1e9), 1_000_000_000)
    return stamp_type(sec=int(sec), nanosec=int(nanosec))


def image_to_rgb(msg, max_side: int = 4096) -> np.ndarray:
    """sensor_msgs/Image (rgb8 or bgr8, any size) -> uint8 [H, W, 3] RGB."""
    if msg.encoding not in ENCODINGS:
        raise ValueError(f"encoding: {msg.encoding!r} is not supported (use {' or '.join(ENCODINGS)})")
    if not (1 <= msg.height <= max_side and 1 <= msg.width <= max_side):
        raise ValueError(f"height/width: {msg.width}x{msg.height} outside 1..{max_side}")
    if msg.step < msg.width * 3:
        raise ValueError(f"step: {msg.step} is less than width * 3 = {msg.width * 3}")
    if len(msg.data) != msg.step * msg.height:
        raise ValueError(f"data: {len(msg.data)} bytes, expected step * height = {msg.step * msg.height}")
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.step)
    image = rows[:, : msg.width * 3].reshape(msg.height, msg.width, 3)
    return np.array(image[..., ::-1] if msg.encoding == "bgr8" else image)  # a writable copy


def rgb_to_image(image: np.ndarray, image_type, stamp=None, encoding: str = "rgb8"):
    """uint8 [H, W, 3] RGB -> sensor_msgs/Image."""
    data = image[..., ::-1] if encoding == "bgr8" else image
    msg = image_type(
        height=image.shape[0],
        width=image.shape[1],
        encoding=encoding,
        is_bigendian=0,
        step=image.shape[1] * 3,
        data=np.ascontiguousarray(data).tobytes(),
    )
    if stamp is not None:
        msg.header.stamp = stamp
    return msg


def state_vector(values, expected: int, field: str = "position") -> np.ndarray:
    state = np.asarray(values, dtype=np.float32)
    if state.ndim != 1 or state.shape[0] != expected:
        raise ValueError(
            f"{field}: {state.shape[0] if state.ndim == 1 else list(state.shape)} values, "
            f"the policy expects {expected}"
        )
    if not np.all(np.isfinite(state)):
        raise ValueError(
            f"{field}: non-finite values at indices {np.flatnonzero(~np.isfinite(state)).tolist()}"
        )
    return state


def state_from_joint_state(names, positions, wanted: list[str], expected: int) -> np.ndarray:
    """sensor_msgs/JointState -> the state vector: by joint name in the order `wanted` when it is given,
    else `position` as it comes (messages without names, or a robot whose driver orders them already)."""
    if not wanted:
        return state_vector(positions, expected, "position")
    names = list(names)
    if len(names) != len(positions):
        raise ValueError(f"name: {len(names)} names for {len(positions)} positions")
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ValueError(f"name: joints {missing} are not in the message ({', '.join(names)})")
    return state_vector([positions[names.index(n)] for n in wanted], expected, "position")
