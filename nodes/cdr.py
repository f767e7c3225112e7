"""A chunk as a serialized trajectory_msgs/JointTrajectory, built with numpy.

rclpy converts a message to C point by point (50 points of a chunk cost ~0.5 ms of Python per
publication, measured in the node); a publisher also takes the serialized bytes (`publish_raw`), which
this module writes in one pass. The layout is ROS 2's default wire format (XCDR1, little-endian, as
rmw_fastrtps and rmw_cyclonedds write it); tests compare it byte for byte with
`rclpy.serialization.serialize_message`.
"""

from __future__ import annotations

import numpy as np

_HEADER = b"\x00\x01\x00\x00"  # encapsulation: CDR, little-endian, no options


def _pad(offset: int, alignment: int) -> int:
    """Bytes of padding before a field of `alignment` at `offset` (from the start of the payload)."""
    return -offset % alignment


def _string(text: str, offset: int) -> bytes:
    data = text.encode() + b"\x00"
    return b"\x00" * _pad(offset, 4) + np.uint32(len(data)).tobytes() + data


def joint_trajectory(
    stamp_sec: int, stamp_nanosec: int, frame_id: str, joint_names, positions: np.ndarray, times_ns
) -> bytes:
    """JointTrajectory with `positions` [points, joints] and each point's time_from_start in ns; the
    points' velocities, accelerations and efforts empty."""
    positions = np.ascontiguousarray(positions, dtype="<f8")
    points, width = positions.shape
    head = bytearray(np.array([stamp_sec], "<i4").tobytes() + np.array([stamp_nanosec], "<u4").tobytes())
    head += _string(frame_id, len(head))
    head += b"\x00" * _pad(len(head), 4) + np.uint32(len(joint_names)).tobytes()
    for name in joint_names:
        head += _string(name, len(head))
    head += b"\x00" * _pad(len(head), 4) + np.uint32(points).tobytes()
    # A point is its positions' count, the doubles (8-aligned), three empty sequences and its time. Once
    # the doubles are aligned a point is a multiple of 8 long, so after the first (which may need 4
    # bytes of padding after its count) the points are fixed-size records: one numpy array.
    stride = 4 + 8 * width + 3 * 4 + 8
    body = np.zeros((points, stride), np.uint8)
    body[:, 0:4] = np.frombuffer(np.uint32(width).tobytes(), np.uint8)
    body[:, 4 : 4 + 8 * width] = positions.view(np.uint8).reshape(points, 8 * width)
    sec, nanosec = np.divmod(np.asarray(times_ns, dtype=np.int64), 1_000_000_000)
    time_fields = np.stack([sec.astype("<u4"), nanosec.astype("<u4")], axis=1)
    body[:, stride - 8 :] = time_fields.view(np.uint8).reshape(points, 8)
    flat = body.tobytes()
    if width and points and _pad(len(head) + 4, 8):
        flat = flat[:4] + b"\x00" * 4 + flat[4:]
    return _HEADER + bytes(head) + flat
