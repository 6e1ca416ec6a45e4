"""The standard-library msgpack subset (protocol/msgpack_codec.py): bytes from the msgpack
spec, the same bytes as the msgpack package writes, the same values as it reads, and every
refusal the protocol relies on (PROTOCOL.md section 2, step 3)."""

from __future__ import annotations

import math

import msgpack  # the reference implementation (a test dependency only)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import msgpack_codec as mp

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=300) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=20)
    | st.dictionaries(st.text(max_size=8), inner, max_size=20),
    max_leaves=40)


@pytest.mark.parametrize(("value", "encoded"), [
    (None, b"\xc0"), (False, b"\xc2"), (True, b"\xc3"),
    (0, b"\x00"), (127, b"\x7f"), (128, b"\xcc\x80"), (255, b"\xcc\xff"),
    (256, b"\xcd\x01\x00"), (65536, b"\xce\x00\x01\x00\x00"),
    (2**64 - 1, b"\xcf" + b"\xff" * 8), (-1, b"\xff"), (-32, b"\xe0"), (-33, b"\xd0\xdf"),
    (-129, b"\xd1\xff\x7f"), (-(2**31), b"\xd2\x80\x00\x00\x00"),
    (-(2**63), b"\xd3\x80" + bytes(7)), (1.5, b"\xcb\x3f\xf8" + bytes(6)),
    ("", b"\xa0"), ("é", b"\xa2\xc3\xa9"), ("a" * 32, b"\xd9\x20" + b"a" * 32),
    ("a" * 256, b"\xda\x01\x00" + b"a" * 256), (b"", b"\xc4\x00"),
    (b"x" * 256, b"\xc5\x01\x00" + b"x" * 256), ([], b"\x90"), ((1, 2), b"\x92\x01\x02"),
    ([0] * 16, b"\xdc\x00\x10" + bytes(16)), ({}, b"\x80"), ({"a": None}, b"\x81\xa1a\xc0"),
    ({str(i): 0 for i in range(16)}, b"\xde\x00\x10"
     + b"".join(b"\xa1" + str(i).encode() + b"\x00" if i < 10 else
                b"\xa2" + str(i).encode() + b"\x00" for i in range(16))),
])
def test_bytes_from_the_spec(value, encoded):
    assert mp.pack(value) == encoded
    assert mp.unpack(encoded) == (list(value) if isinstance(value, tuple) else value)


def test_float32_is_read():
    assert mp.unpack(b"\xca\x3f\xc0\x00\x00") == 1.5


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_packs_exactly_as_the_msgpack_package_and_reads_its_bytes(value):
    reference = msgpack.packb(value, use_bin_type=True)
    assert mp.pack(value) == reference
    again = mp.unpack(reference, max_array_len=1024, max_map_len=256)
    assert msgpack.packb(again, use_bin_type=True) == reference  # NaN-safe comparison


def _reference_unpack(data: bytes):
    def refuse(code, payload):
        raise ValueError("ext")

    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0,
                           ext_hook=refuse, max_array_len=1024, max_map_len=256)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64) | values.map(lambda v: msgpack.packb(v)[:-1]))
def test_accepts_and_refuses_what_the_msgpack_package_did(data):
    """Random and truncated bytes: accepted by both with the same value, or refused by both."""
    try:
        expected = _reference_unpack(data)
    except Exception:
        with pytest.raises(mp.DecodeError):
            mp.unpack(data, max_array_len=1024, max_map_len=256)
        return
    got = mp.unpack(data, max_array_len=1024, max_map_len=256)
    assert msgpack.packb(got, use_bin_type=True) == msgpack.packb(expected, use_bin_type=True)


@pytest.mark.parametrize(("data", "match"), [
    (b"\xd4\x01\x00", "extension"),  # fixext 1
    (b"\xc7\x00\x01", "extension"),  # a zero-length ext 8
    (b"\xc1", "not msgpack"),  # the one reserved byte
    (b"\xa5abc", "truncated"),
    (b"\xcd\x01", "truncated"),
    (b"\x80\x00", "extra data"),
    (b"\x81\x01\x02", "keys must be strings"),
    (b"\x81\x90\x00", "keys must be strings"),
    (b"\xa2\xc3\x28", "UTF-8"),
    (b"\xdd\xff\xff\xff\xff", "exceeds the limit of 1024"),  # checked before any item is read
    (b"\xdf\x00\x00\x01\x01", "exceeds the limit of 256"),
    (b"\x91" * 33 + b"\xc0", "deeper than 32"),
])
def test_refusals(data, match):
    with pytest.raises(mp.DecodeError, match=match):
        mp.unpack(data, max_array_len=1024, max_map_len=256)


def test_nesting_limit_holds_both_ways_and_the_protocols_depth_fits():
    deep: list = []
    for _ in range(mp.MAX_DEPTH - 1):
        deep = [deep]
    assert mp.unpack(mp.pack(deep)) == deep  # 32 levels: fine
    with pytest.raises(ValueError, match="deeper"):
        mp.pack([deep])


def test_what_cannot_be_packed_is_a_type_or_overflow_error():
    with pytest.raises(TypeError, match="set"):
        mp.pack({1, 2})
    with pytest.raises(OverflowError):
        mp.pack(2**64)
    with pytest.raises(OverflowError):
        mp.pack(-(2**63) - 1)
    assert math.isnan(mp.unpack(mp.pack(float("nan"))))
