"""The chunk's hand-written serialization against rclpy's own (de)serializer."""

from __future__ import annotations

import array

import numpy as np
from builtin_interfaces.msg import Duration
from rclpy.serialization import deserialize_message, serialize_message
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
from vla_runtime.nodes import cdr


def random_trajectory(rng):
    """Sizes and string lengths drawn so that every alignment case (padding before the doubles of the
    first point or not, empty points, empty names) comes up over a few dozen draws."""
    points, width = int(rng.integers(0, 60)), int(rng.integers(0, 10))
    names = ["j" * int(rng.integers(0, 7)) + str(i) for i in range(int(rng.integers(0, 9)))]
    frame = "f" * int(rng.integers(0, 5))
    positions = rng.standard_normal((points, width))
    times_ns = [int(k * rng.integers(1, 3_000_000_000)) for k in range(points)]
    stamp = int(rng.integers(0, 2**31)), int(rng.integers(0, 1_000_000_000))
    return stamp, frame, names, positions, times_ns


def test_rclpy_reads_back_what_was_written(rng):
    for _ in range(200):
        stamp, frame, names, positions, times_ns = random_trajectory(rng)
        msg = deserialize_message(
            cdr.joint_trajectory(*stamp, frame, names, positions, times_ns), JointTrajectory
        )
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (*stamp, frame)
        assert list(msg.joint_names) == names and len(msg.points) == len(positions)
        for point, row, t in zip(msg.points, positions, times_ns, strict=True):
            np.testing.assert_array_equal(np.asarray(point.positions), row)
            assert point.time_from_start.sec * 1_000_000_000 + point.time_from_start.nanosec == t
            assert not (len(point.velocities) or len(point.accelerations) or len(point.effort))


def test_the_same_message_as_rclpy_writes(rng):
    """Not byte for byte: rclpy leaves padding bytes uninitialised and returns a few bytes past the end."""
    for _ in range(50):
        stamp, frame, names, positions, times_ns = random_trajectory(rng)
        msg = JointTrajectory(joint_names=names)
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        msg.header.frame_id = frame
        msg.points = [
            JointTrajectoryPoint(
                positions=array.array("d", row.tobytes()),
                time_from_start=Duration(sec=t // 1_000_000_000, nanosec=t % 1_000_000_000),
            )
            for row, t in zip(positions, times_ns, strict=True)
        ]
        ours = cdr.joint_trajectory(*stamp, frame, names, positions, times_ns)
        theirs = serialize_message(msg)
        assert len(theirs) >= len(ours)
        assert deserialize_message(theirs, JointTrajectory) == deserialize_message(ours, JointTrajectory)
