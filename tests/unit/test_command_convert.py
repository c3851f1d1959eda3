"""Engineering value → raw value: tables per type, and the round trip against the
normaliser's forward conversion (agent.normalize.scale_value)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.command.convert import (
    TYPES,
    ConversionError,
    engineering_range,
    to_raw,
    values_match,
)
from agent.normalize import scale_value


@pytest.mark.parametrize(
    ("value", "type_name", "scale", "offset", "raw"),
    [
        (True, "bool", 1.0, 0.0, True),
        (False, "bit", 1.0, 0.0, False),
        (1, "Boolean", 1.0, 0.0, True),
        (0, "bool", 2.0, 5.0, False),  # bits are not scaled (as on reads)
        (21.5, "int16", 0.1, 0.0, 215),
        (21.37, "int16", 0.1, 0.0, 214),  # rounded to the nearest raw step
        (-40.0, "int16", 0.5, -40.0, 0),
        (100.0, "uint16", 1.0, 0.0, 100),
        (65535, "uint16", 1.0, 0.0, 65535),
        (-32768, "int16", 1.0, 0.0, -32768),
        (2.5, "int32", 1.0, 0.0, 2),  # half to even
        (3.5, "dint", 1.0, 0.0, 4),
        (255, "byte", 1.0, 0.0, 255),
        (2**63 - 1, "int64", 1.0, 0.0, 2**63 - 1),  # exact: no float in between
        (2**64 - 1, "UInt64", 1.0, 0.0, 2**64 - 1),
        (1.5, "float64", 1.0, 0.0, 1.5),
        (10.0, "lreal", 2.0, 0.0, 5.0),
        (0.1, "float32", 1.0, 0.0, struct.unpack("<f", struct.pack("<f", 0.1))[0]),
        (7, "real", 1.0, 0.0, 7.0),
        ("AB-12", "string", 1.0, 0.0, "AB-12"),
        ("", "String", 1.0, 0.0, ""),
    ],
)
def test_to_raw(value: object, type_name: str, scale: float, offset: float, raw: object) -> None:
    got = to_raw(value, TYPES[type_name], scale, offset)
    assert got == raw
    assert type(got) is type(raw)


@pytest.mark.parametrize(
    ("value", "type_name", "scale", "code", "text"),
    [
        ("on", "bool", 1.0, "wrong_type", "'on' is not a bool (true/false) for bool"),
        (2, "bool", 1.0, "wrong_type", "2 is not a bool (true/false) for bool"),
        (True, "int16", 1.0, "wrong_type", "True is not a number for int16"),
        ("12", "uint16", 1.0, "wrong_type", "'12' is not a number for uint16"),
        (12, "string", 1.0, "wrong_type", "12 is not text for string"),
        (math.nan, "float32", 1.0, "not_finite", "nan is not a finite number"),
        (math.inf, "int16", 1.0, "not_finite", "inf is not a finite number"),
        (
            65536,
            "uint16",
            1.0,
            "out_of_range",
            "65536 is out of range: uint16 holds 0 .. 65,535",
        ),
        (-1, "uint16", 1.0, "out_of_range", "-1 is out of range: uint16 holds 0 .. 65,535"),
        (
            3276.8,
            "int16",
            0.1,
            "out_of_range",
            "3276.8 is out of range (raw 32,768): int16 holds -32,768 .. 32,767",
        ),
        (
            1e39,
            "float32",
            1.0,
            "out_of_range",
            "1e+39 is out of range: float32 holds ±3.402823e+38",
        ),
        (5, "int16", 0.0, "scale_zero", "scale 0 cannot be inverted"),
    ],
)
def test_to_raw_refuses(value: object, type_name: str, scale: float, code: str, text: str) -> None:
    with pytest.raises(ConversionError) as err:
        to_raw(value, TYPES[type_name], scale, 0.0)
    assert (err.value.code, err.value.text) == (code, text)


def test_engineering_range() -> None:
    assert engineering_range(TYPES["uint16"], 0.5, 0.0) == (0.0, 32767.5)
    assert engineering_range(TYPES["int16"], -1.0, 0.0) == (-32767.0, 32768.0)
    assert engineering_range(TYPES["float64"], 1.0, 0.0) is None
    assert engineering_range(TYPES["bool"], 1.0, 0.0) is None


def test_values_match() -> None:
    f32 = struct.unpack("<f", struct.pack("<f", 21.37))[0]
    assert values_match(f32, f32, 21.37, f32, 0.0)  # exact on the raw value
    assert not values_match(214, 213, 21.4, 21.3, 0.0)
    assert values_match(214, 213, 21.4, 21.3, 0.15)
    assert not values_match(True, 1, True, 1, 0.0)  # a bit is not a number
    assert values_match("A", "A", "A", "A", 0.0)


_INT_TYPES = [n for n, t in TYPES.items() if t.kind == "int"]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_INT_TYPES),
    st.data(),
    st.sampled_from([1.0, 0.1, 0.01, 2.0, -1.0, 0.5, 10.0]),
    st.sampled_from([0.0, -40.0, 273.15, 1000.0]),
)
def test_int_round_trip(type_name: str, data: st.DataObject, scale: float, offset: float) -> None:
    """Every raw value of the type, published forward and written back, is the same raw
    value (while the float64 arithmetic is exact enough for the width)."""
    t = TYPES[type_name]
    lo, hi = t.int_range()
    if t.bits == 64 and (scale != 1.0 or offset != 0.0):
        lo, hi = -(2**50), 2**50  # float64 holds 53 bits: beyond, scaling is lossy
        lo = max(lo, t.int_range()[0])
    raw = data.draw(st.integers(lo, hi))
    identity = scale == 1.0 and offset == 0.0
    # As the normaliser publishes it: scale/offset applied only when they are not 1/0.
    value = raw if identity else scale_value(raw, scale, offset)
    assert to_raw(value, t, scale, offset) == raw


@settings(max_examples=300, deadline=None)
@given(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 0.1, 2.0, -3.0]),
    st.sampled_from([0.0, 100.0]),
)
def test_float32_round_trip(raw: float, scale: float, offset: float) -> None:
    value = scale_value(raw, scale, offset)
    assert isinstance(value, float)
    if not math.isfinite(value) or abs(raw) > 1e30:
        return
    back = to_raw(value, TYPES["float32"], scale, offset)
    assert isinstance(back, float)
    if scale == 1.0 and offset == 0.0:
        assert back == raw
    else:
        # One float64 rounding each way: within one float32 step of the raw value.
        step = abs(raw) * 2**-23 + 1e-38 + abs(offset / scale) * 2**-52 * 4
        assert abs(back - raw) <= step


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_float64_identity_round_trip(raw: float) -> None:
    assert to_raw(scale_value(raw, 1.0, 0.0), TYPES["float64"]) == raw


def test_the_devices_own_type() -> None:
    from agent.command.convert import ANY

    assert to_raw(5, ANY) == 5
    assert to_raw(5.0, ANY) == 5  # whole: an integer, which every numeric type accepts
    assert type(to_raw(5.0, ANY)) is int
    assert to_raw(21.5, ANY, 0.1) == 215
    assert to_raw(21.37, ANY) == 21.37
    assert to_raw(True, ANY) is True
    assert to_raw("x", ANY) == "x"
    with pytest.raises(ConversionError, match="not a finite number"):
        to_raw(math.nan, ANY)


def test_an_opcua_tag_is_written_with_the_nodes_own_type() -> None:
    """An OPC UA tag's `type` is only what the simulator serves (default Double): a write
    must not be converted to it, or an integer node left at the default would get a float
    the driver refuses. The driver builds the Variant from the node's DataType."""
    from agent.command.convert import ANY, raw_type
    from drivers.opcua.config import OpcUaTag

    tag = OpcUaTag(name="setpoint", node_id="ns=2;s=Setpoint")
    assert tag.type == "Double"
    assert raw_type(tag) is ANY
    assert type(to_raw(5.0, raw_type(tag) or ANY)) is int


def test_an_opcua_tag_that_names_its_type_is_converted_to_it() -> None:
    from agent.command.convert import raw_type
    from drivers.opcua.config import OpcUaTag

    tag = OpcUaTag(name="sp", node_id="ns=2;s=Sp", type="Float")
    assert raw_type(tag) is TYPES["Float"]
    assert to_raw(182.7, TYPES["Float"]) == struct.unpack("<f", struct.pack("<f", 182.7))[0]


def test_a_float32_node_written_in_its_own_type_verifies() -> None:
    held = struct.unpack("<f", struct.pack("<f", 182.7))[0]
    # Written as the device's own type: the node rounded it to float32, as asked.
    assert values_match(182.7, held, 182.7, held, 0.0, device_type=True)
    # Converted to a declared float64 type: a float32-rounded read-back is not the value.
    assert not values_match(182.7, held, 182.7, held, 0.0)
    assert not values_match(182.7, 182.6, 182.7, 182.6, 0.0, device_type=True)
