"""Property-based checks of the ROS conversions and of parameter validation: images of any size,
encoding and row padding come back exactly; a bad image or state is refused naming its field; a setting
accepted by its own check passes the node's parameter check and the launch-argument parser."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sensor_msgs.msg import Image
from vla_runtime.nodes.conversions import image_to_rgb, rgb_to_image, state_vector
from vla_runtime.nodes.params import BY_NAME, launch_overrides
from vla_runtime.runtime.settings import SETTINGS

images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)))


@settings(max_examples=100, deadline=None)
@given(images, st.sampled_from(["rgb8", "bgr8"]), st.integers(0, 7))
def test_any_image_round_trips_with_row_padding(image, encoding, padding):
    msg = rgb_to_image(image, Image, encoding=encoding)
    if padding:  # a driver's rows padded to a larger step
        rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
        padded = np.concatenate([rows, np.full((msg.height, padding), 7, np.uint8)], axis=1)
        msg.step, msg.data = msg.step + padding, padded.tobytes()
    np.testing.assert_array_equal(image_to_rgb(msg), image)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 20), st.integers(1, 20), st.integers(0, 2000), st.sampled_from(["rgb8", "mono8", "rgba8"])
)
def test_a_malformed_image_is_refused_naming_the_field(height, width, size, encoding):
    msg = Image(height=height, width=width, encoding=encoding, step=width * 3, data=bytes(size))
    if encoding == "rgb8" and size == height * width * 3:
        assert image_to_rgb(msg).shape == (height, width, 3)
        return
    with pytest.raises(ValueError, match=r"^(encoding|data):"):
        image_to_rgb(msg)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=12), st.integers(1, 12))
def test_a_state_is_taken_only_when_complete_and_finite(values, expected):
    ok = len(values) == expected and all(math.isfinite(v) for v in values)
    if ok:
        np.testing.assert_array_equal(state_vector(values, expected), np.asarray(values, np.float32))
    else:
        with pytest.raises(ValueError, match=r"^position:"):
            state_vector(values, expected)


def values_of(setting):
    if setting.words is not None:
        return st.sampled_from(list(setting.words) + ["maybe", "true"])
    if setting.kind is bool:
        return st.booleans()
    if setting.choices:
        return st.sampled_from(list(setting.choices) + ["nope"])
    if setting.kind is int:
        return st.integers(-5, int(min(setting.range[1], 10**6)) + 5 if setting.range else 100)
    if setting.kind is float:
        return st.floats(-1.0, (setting.range[1] if setting.range else 10.0) * 1.5, allow_nan=False)
    return st.text(max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SETTINGS).flatmap(lambda s: st.tuples(st.just(s), values_of(s))))
def test_the_node_and_the_launch_file_accept_exactly_what_a_setting_accepts(setting_and_value):
    setting, value = setting_and_value
    accepted = setting.check(value) is None
    assert (BY_NAME[setting.name].check(value) is None) == accepted
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if text == "":
        return  # an empty launch argument means "not given"
    try:
        launch_overrides({setting.name: text})
    except ValueError as err:
        assert not accepted or "expected" in str(err), err  # refused by type, or by the same check
    else:
        assert accepted
