"""Every protocol that declares the "write" capability keeps the WritingDriver contract,
and its encoding of a raw value is the exact inverse of its decoding (property-based)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import registry
from drivers.base import DeviceCommon, DriverContext, Scalar, WritingDriver

DEVICES: dict[str, dict[str, Any]] = {
    "modbus": {"host": "127.0.0.1", "tags": [{"name": "t", "address": 0}]},
    "opcua": {"endpoint": "opc.tcp://127.0.0.1:4840", "tags": [{"name": "t", "node_id": "i=1"}]},
    "melsec": {"series": "q", "host": "127.0.0.1", "port": 5000,
               "tags": [{"name": "t", "address": "D0"}]},
    "xgt": {"host": "127.0.0.1", "tags": [{"name": "t", "address": "%MW0"}]},
    "s7": {"host": "127.0.0.1", "tags": [{"name": "t", "address": "DB1.DBW0"}]},
}  # fmt: skip


def test_the_builtin_protocols_that_write() -> None:
    writing = sorted(p.name for p in registry.protocols().values() if "write" in p.capabilities)
    assert writing == sorted(DEVICES)


@pytest.mark.parametrize("name", sorted(DEVICES))
async def test_a_writing_protocol_makes_writing_drivers_and_names_its_refusals(
    name: str,
) -> None:
    entry = registry.get(name)
    device = entry.device_model.model_validate({"name": "dev", "protocol": name, **DEVICES[name]})
    driver = entry.create_driver(device, DriverContext())
    assert isinstance(driver, WritingDriver)
    assert type(device).write_refusal is not DeviceCommon.write_refusal
    assert device.write_refusal("t") is None
    assert device.write_refusal("nope") == "no tag 'nope' on device 'dev'"


# ------------------------------------------------------------------ encode ∘ decode


FLOAT64 = st.floats(allow_nan=False, allow_infinity=False)
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(st.sampled_from(["int16", "uint16", "int32", "uint32", "int64", "uint64"]), st.data())
def test_melsec_integers_decode_to_what_was_encoded(data_type: str, data: st.DataObject) -> None:
    from drivers.melsec.codec import SlotCodec, encode_raw

    bits = {"16": 16, "32": 32, "64": 64}[data_type[-2:]]
    lo, hi = (
        (0, (1 << bits) - 1) if data_type[0] == "u" else (-(1 << bits - 1), (1 << bits - 1) - 1)
    )
    value = data.draw(st.integers(lo, hi))
    raw = encode_raw(data_type, value, bits // 16)
    assert SlotCodec("word", data_type, 0, size=len(raw)).decode(raw) == value


@given(FLOAT32, FLOAT64)
def test_melsec_floats_decode_to_what_was_encoded(f32: float, f64: float) -> None:
    from drivers.melsec.codec import SlotCodec, encode_raw

    assert SlotCodec("word", "float32", 0, size=4).decode(encode_raw("float32", f32, 2)) == f32
    assert SlotCodec("word", "float64", 0, size=8).decode(encode_raw("float64", f64, 4)) == f64


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12))
def test_melsec_strings_decode_to_what_was_encoded(text: str) -> None:
    from drivers.melsec.codec import SlotCodec, encode_raw

    raw = encode_raw("string", text, 6)
    assert len(raw) == 12
    assert SlotCodec("word", "string", 0, size=12).decode(raw) == text


@given(
    st.sampled_from(["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]),
    st.data(),
)
def test_xgt_integers_decode_to_what_was_encoded(data_type: Any, data: st.DataObject) -> None:
    from drivers.xgt.codec import BlockDecoder, ValueSpec, encode_value

    bits = int(data_type.lstrip("uint"))
    lo, hi = (
        (0, (1 << bits) - 1) if data_type[0] == "u" else (-(1 << bits - 1), (1 << bits - 1) - 1)
    )
    value = data.draw(st.integers(lo, hi))
    spec = ValueSpec(data_type)
    assert BlockDecoder([(0, spec)]).decode(encode_value(spec, value)) == [value]


@given(FLOAT32, FLOAT64)
def test_xgt_floats_decode_to_what_was_encoded(f32: float, f64: float) -> None:
    from drivers.xgt.codec import BlockDecoder, ValueSpec, encode_value

    for data_type, value in (("float32", f32), ("float64", f64)):
        spec = ValueSpec(data_type)  # type: ignore[arg-type]
        assert BlockDecoder([(0, spec)]).decode(encode_value(spec, value)) == [value]


@given(
    st.sampled_from(["byte", "int", "word", "dint", "dword", "real", "lreal"]),
    st.data(),
)
def test_s7_values_decode_to_what_the_driver_encodes(data_type: str, data: st.DataObject) -> None:
    from drivers.s7.codec import INT_RANGE, decode
    from drivers.s7.config import S7Tag
    from drivers.s7.driver import _encode_raw
    from drivers.s7.plan import spec_of

    letter = {"byte": "B", "int": "W", "word": "W", "dint": "D", "dword": "D", "real": "D"}
    address = f"DB1.DB{letter.get(data_type, 'B')}10"
    tag = S7Tag.model_validate({"name": "t", "address": address, "type": data_type})
    if data_type in INT_RANGE:
        value: float = data.draw(st.integers(*INT_RANGE[data_type]))
    else:
        value = data.draw(FLOAT32 if data_type == "real" else FLOAT64)
    start, raw = _encode_raw(tag, value)
    assert start == 10
    assert decode(spec_of(tag), raw, 0) == value


def test_s7_strings_are_written_from_the_current_length_byte() -> None:
    from drivers.s7.codec import ValueSpec, decode
    from drivers.s7.config import S7Tag
    from drivers.s7.driver import _encode_raw

    tag = S7Tag.model_validate({"name": "t", "address": "DB1.DBB4", "type": "string", "length": 6})
    start, raw = _encode_raw(tag, "Grüße")
    assert start == 5  # byte 4 holds the maximum length: not written
    assert raw == b"\x05Gr\xfc\xdfe\x00"
    assert decode(ValueSpec("string", 0, 6), b"\x06" + raw, 0) == "Grüße"


SCALARS: dict[str, st.SearchStrategy[Scalar]] = {
    "Boolean": st.booleans(),
    "SByte": st.integers(-(1 << 7), (1 << 7) - 1),
    "Byte": st.integers(0, (1 << 8) - 1),
    "Int16": st.integers(-(1 << 15), (1 << 15) - 1),
    "UInt16": st.integers(0, (1 << 16) - 1),
    "Int32": st.integers(-(1 << 31), (1 << 31) - 1),
    "UInt32": st.integers(0, (1 << 32) - 1),
    "Int64": st.integers(-(1 << 63), (1 << 63) - 1),
    "UInt64": st.integers(0, (1 << 64) - 1),
    "Float": FLOAT32,
    "Double": FLOAT64,
    "String": st.text(max_size=20),
}


@given(st.sampled_from(sorted(SCALARS)), st.data())
def test_opcua_variants_survive_asyncuas_own_binary_codec(name: str, data: st.DataObject) -> None:
    """The Variant a write sends, encoded and decoded by asyncua's binary codec: the same
    type and exactly the value (a float32 value survives a Float variant exactly)."""
    from asyncua import ua
    from asyncua.common.utils import Buffer
    from asyncua.ua.ua_binary import variant_from_binary, variant_to_binary

    from drivers.opcua.driver import variant_for

    vtype = getattr(ua.VariantType, name)
    value = data.draw(SCALARS[name])
    back = variant_from_binary(Buffer(variant_to_binary(variant_for(vtype, value))))
    assert back.VariantType == vtype
    assert back.Value == value
    assert type(back.Value) is type(value) or (
        name in ("Float", "Double") and isinstance(value, float)
    )


def test_opcua_float_takes_the_float32_rounding_of_a_double() -> None:
    from asyncua import ua
    from asyncua.common.utils import Buffer
    from asyncua.ua.ua_binary import variant_from_binary, variant_to_binary

    from drivers.opcua.driver import variant_for

    back = variant_from_binary(Buffer(variant_to_binary(variant_for(ua.VariantType.Float, 0.1))))
    assert back.Value == struct.unpack("<f", struct.pack("<f", 0.1))[0] != 0.1
    assert math.isclose(back.Value, 0.1, rel_tol=2**-23)
