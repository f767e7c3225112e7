"""Recorded observations: what the recorder writes reads back identically, as ROS 2 messages on the node's
topics (the format of `ros2 bag record`), under any namespace; bad files are named."""

from __future__ import annotations

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from vla_runtime.runtime.recording import ObservationRecorder, read_observations

from ..conftest import random_observation

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@pytest.mark.parametrize("namespace", ["", "/arm"])
def test_round_trip(tmp_path, rng, namespace):
    frames = [random_observation(rng, skip=("right_wrist_0_rgb",)) for _ in range(4)]
    for i, obs in enumerate(frames):
        obs.timestamp = 100.0 + 0.05 * i
    path = tmp_path / "obs.mcap"
    with ObservationRecorder(path, namespace) as rec:
        for obs in frames:
            rec.write(obs)
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        topics = {c.topic: s.name for s, c, _, _ in reader.iter_decoded_messages()}
    assert topics == {
        f"{namespace}/camera/base_0_rgb/image_raw": "sensor_msgs/msg/Image",
        f"{namespace}/camera/left_wrist_0_rgb/image_raw": "sensor_msgs/msg/Image",
        f"{namespace}/joint_states": "sensor_msgs/msg/JointState",
        f"{namespace}/instruction": "std_msgs/msg/String",
    }
    back = read_observations(path, CAMERAS, state_dim=8)
    assert len(back) == len(frames)
    for a, b in zip(frames, back, strict=True):
        assert set(a.images) == set(b.images)
        for name in a.images:
            np.testing.assert_array_equal(a.images[name], b.images[name])
        np.testing.assert_allclose(a.state, b.state, rtol=1e-6)
        assert a.instruction == b.instruction and abs(a.timestamp - b.timestamp) < 1e-6
    assert len(read_observations(path, CAMERAS, 8, max_frames=2)) == 2


def test_bad_recordings_are_named(tmp_path, rng):
    with pytest.raises(ValueError, match="observations: no file"):
        read_observations(tmp_path / "nope.mcap", CAMERAS, 8)
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"not an mcap file at all")
    with pytest.raises(ValueError, match="observations: cannot read .*junk.mcap"):
        read_observations(junk, CAMERAS, 8)
    path = tmp_path / "other.mcap"
    with ObservationRecorder(path) as rec:
        rec.write(random_observation(rng))
    with pytest.raises(ValueError, match="no camera topic of this model"):
        read_observations(path, ("top_cam",), 8)
    with pytest.raises(ValueError, match="position: 8 values, the policy expects 9"):
        read_observations(path, CAMERAS, 9)
    with pytest.raises(ValueError, match="position: 8 values, the policy expects 7"):
        read_observations(path, CAMERAS, 7)  # longer than state_dim: refused as the node does, not cut
    empty = tmp_path / "empty.mcap"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read .*empty.mcap as an MCAP recording: the file is empty"):
        read_observations(empty, CAMERAS, 8)


def test_an_existing_recording_is_never_overwritten(tmp_path, rng):
    path = tmp_path / "kept.mcap"
    with ObservationRecorder(path) as rec:
        rec.write(random_observation(rng))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"record: .*kept.mcap exists; give a path that does not"):
        ObservationRecorder(path)
    assert path.read_bytes() == before and len(read_observations(path, CAMERAS, 8)) == 1


def test_a_recording_its_writer_never_finished_is_read_to_the_cut(tmp_path, rng, caplog):
    """A node killed while recording leaves no summary and half a chunk at the end: the observations of
    the complete chunks are read back, equal to those written, with a warning that says the file was cut;
    a file cut before any complete chunk is named as unreadable."""
    path = tmp_path / "killed.mcap"
    written = [random_observation(rng, side=96) for _ in range(60)]  # ~5 MB: chunks of 1 MB get written
    recorder = ObservationRecorder(path)
    for obs in written:
        recorder.write(obs)
    recorder._file.flush()  # the process dies here: the writer's last chunk and summary never written
    with caplog.at_level("WARNING"):
        read = read_observations(path, CAMERAS, 8)
    assert 0 < len(read) < len(written)
    for a, b in zip(read, written, strict=False):
        assert a.images.keys() == b.images.keys()
        for name in a.images:
            np.testing.assert_array_equal(a.images[name], b.images[name])
        np.testing.assert_allclose(a.state, b.state, rtol=1e-6)
    assert f"read the {len(read)} observations before the cut" in caplog.text
    assert "was not finished by its writer" in caplog.text
    recorder._file.close()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(path.read_bytes()[:2000])  # inside the first chunk
    with pytest.raises(
        ValueError, match=r"cannot read .*cut.mcap as an MCAP recording: .*before any message"
    ):
        read_observations(cut, CAMERAS, 8)
