"""Property-based checks of the sim wire protocol: any message of allowed values survives encode/decode;
any byte string either decodes to a map or is refused as a ProtocolError (never another exception)."""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from vla_runtime.sim import protocol

arrays = st.sampled_from(protocol.ARRAY_DTYPES).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.text(max_size=20)
)
values = st.recursive(
    st.one_of(scalars, arrays),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "v"), values, max_size=6))
def test_any_allowed_message_round_trips(message):
    decoded = protocol.decode(protocol.encode(message))
    assert decoded.pop("v") == protocol.VERSION and same(message, decoded)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_are_refused_by_name(payload):
    try:
        message = protocol.decode(payload)
    except protocol.ProtocolError as err:
        assert ":" in str(err)  # "field: reason"
    else:
        assert isinstance(message, dict) and message["v"] == protocol.VERSION


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(protocol.ARRAY_DTYPES),
    st.lists(st.integers(0, 6), max_size=3),
    st.binary(max_size=64),
)
def test_a_forged_array_is_refused_unless_its_bytes_fit(dtype, shape, data):
    payload = msgpack.packb(
        {"v": protocol.VERSION, "a": {"__nd__": True, "dtype": dtype, "shape": shape, "data": data}},
        use_bin_type=True,
    )
    fits = len(data) == int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        array = protocol.decode(payload)["a"]
    except protocol.ProtocolError as err:
        assert not fits and str(err).startswith("array data:")
    else:
        assert fits and array.shape == tuple(shape) and array.tobytes() == data
