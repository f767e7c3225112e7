from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import Image
from vla_runtime.nodes.conversions import (
    image_to_rgb,
    rgb_to_image,
    seconds_to_stamp,
    stamp_to_seconds,
    state_vector,
)


def test_image_round_trip_rgb_and_bgr(rng):
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for encoding in ("rgb8", "bgr8"):
        np.testing.assert_array_equal(image_to_rgb(rgb_to_image(image, Image, encoding=encoding)), image)


def test_row_padding_is_skipped(rng):
    image = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    padded = np.zeros((3, 16), np.uint8)
    padded[:, :12] = image.reshape(3, 12)
    msg = Image(height=3, width=4, encoding="rgb8", step=16, data=padded.tobytes())
    np.testing.assert_array_equal(image_to_rgb(msg), image)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"encoding": "mono8"}, "encoding"),
        ({"step": 5}, "step"),
        ({"data": bytes(5)}, "data"),
        ({"width": 0}, "height/width"),
    ],
)
def test_bad_images_name_the_field(changes, field):
    fields = {"height": 2, "width": 2, "encoding": "rgb8", "step": 6, "data": bytes(12), **changes}
    with pytest.raises(ValueError, match=field):
        image_to_rgb(Image(**fields))


def test_state_and_stamps():
    assert state_vector([1, 2, 3], 3).dtype == np.float32
    with pytest.raises(ValueError, match="position: 2 values"):
        state_vector([1, 2], 3)
    with pytest.raises(ValueError, match="non-finite"):
        state_vector([1, float("inf"), 3], 3)
    assert stamp_to_seconds(seconds_to_stamp(12.25, Time)) == pytest.approx(12.25)


def test_a_stamp_whose_fraction_rounds_up_carries_into_the_seconds():
    """A lockstep clock of 0.05 s steps from 1000 reaches 1000.9999999999991 at step 20: its stamp is
    1001 s, never 1000 s (the node saw the clock go back and the bridge waited for a chunk forever)."""
    t = 1000.0
    for _ in range(20):
        t += 0.05
    stamp = seconds_to_stamp(t, Time)
    assert (stamp.sec, stamp.nanosec) == (1001, 0)
    stamps = []
    for step in range(200):  # every stamp of a long lockstep run moves forward
        stamp = seconds_to_stamp(1000.0 + step * 0.05, Time)
        assert 0 <= stamp.nanosec < 1_000_000_000
        stamps.append(stamp.sec + stamp.nanosec * 1e-9)
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False))
    negative = seconds_to_stamp(-0.25, Time)
    assert (negative.sec, negative.nanosec) == (-1, 750_000_000)


def test_joint_state_by_name_in_the_configured_order():
    from vla_runtime.nodes.conversions import state_from_joint_state

    names = ["finger", "shoulder", "elbow"]
    state = state_from_joint_state(names, [0.5, 1.0, 2.0], ["shoulder", "elbow", "finger"], 3)
    assert state.tolist() == [1.0, 2.0, 0.5]
    assert state_from_joint_state([], [1.0, 2.0], [], 2).tolist() == [1.0, 2.0]  # no order: as it comes
    with pytest.raises(ValueError, match=r"name: joints \['wrist'\] are not in the message"):
        state_from_joint_state(names, [0.5, 1.0, 2.0], ["shoulder", "wrist"], 2)
    with pytest.raises(ValueError, match="name: 2 names for 3 positions"):
        state_from_joint_state(names[:2], [0.5, 1.0, 2.0], ["shoulder"], 1)
