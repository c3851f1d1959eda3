"""Modbus codec: known byte patterns for every type x byte order, round trips, failures."""

from __future__ import annotations

import math
import struct
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import Scalar
from drivers.modbus.codec import (
    BlockDecoder,
    CodecError,
    DecodeFailure,
    ValueSpec,
    decode,
    decode_block,
    encode,
)
from drivers.modbus.config import ByteOrder, DataType, ModbusTag

# (type, order, value, registers on the wire)
CASES: list[tuple[DataType, ByteOrder, Scalar, list[int]]] = [
    # 16-bit: ABCD/CDAB big-endian, BADC/DCBA bytes swapped
    ("uint16", "ABCD", 0x1234, [0x1234]),
    ("uint16", "CDAB", 0x1234, [0x1234]),
    ("uint16", "BADC", 0x1234, [0x3412]),
    ("uint16", "DCBA", 0x1234, [0x3412]),
    ("int16", "ABCD", -2, [0xFFFE]),
    ("int16", "CDAB", -2, [0xFFFE]),
    ("int16", "BADC", -2, [0xFEFF]),
    ("int16", "DCBA", -2, [0xFEFF]),
    ("int16", "ABCD", -32768, [0x8000]),
    # 32-bit
    ("uint32", "ABCD", 0x11223344, [0x1122, 0x3344]),
    ("uint32", "CDAB", 0x11223344, [0x3344, 0x1122]),
    ("uint32", "BADC", 0x11223344, [0x2211, 0x4433]),
    ("uint32", "DCBA", 0x11223344, [0x4433, 0x2211]),
    ("int32", "ABCD", -123456, [0xFFFE, 0x1DC0]),
    ("int32", "CDAB", -123456, [0x1DC0, 0xFFFE]),
    ("int32", "BADC", -123456, [0xFEFF, 0xC01D]),
    ("int32", "DCBA", -123456, [0xC01D, 0xFEFF]),
    ("float32", "ABCD", struct.unpack(">f", bytes.fromhex("42F6E979"))[0], [0x42F6, 0xE979]),
    ("float32", "CDAB", struct.unpack(">f", bytes.fromhex("42F6E979"))[0], [0xE979, 0x42F6]),
    ("float32", "BADC", struct.unpack(">f", bytes.fromhex("42F6E979"))[0], [0xF642, 0x79E9]),
    ("float32", "DCBA", struct.unpack(">f", bytes.fromhex("42F6E979"))[0], [0x79E9, 0xF642]),
    ("float32", "ABCD", -1.5, [0xBFC0, 0x0000]),
    # 64-bit: ABCD → ABCDEFGH, CDAB → GHEFCDAB, BADC → BADCFEHG, DCBA → HGFEDCBA
    ("uint64", "ABCD", 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("uint64", "CDAB", 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("uint64", "BADC", 0x0102030405060708, [0x0201, 0x0403, 0x0605, 0x0807]),
    ("uint64", "DCBA", 0x0102030405060708, [0x0807, 0x0605, 0x0403, 0x0201]),
    ("int64", "ABCD", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("int64", "CDAB", -2, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("int64", "BADC", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
    ("int64", "DCBA", -2, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("float64", "ABCD", 1.0, [0x3FF0, 0x0000, 0x0000, 0x0000]),
    ("float64", "CDAB", 1.0, [0x0000, 0x0000, 0x0000, 0x3FF0]),
    ("float64", "BADC", 1.0, [0xF03F, 0x0000, 0x0000, 0x0000]),
    ("float64", "DCBA", 1.0, [0x0000, 0x0000, 0x0000, 0xF03F]),
    ("float64", "ABCD", -273.15, list(struct.unpack(">4H", struct.pack(">d", -273.15)))),
]


def _id(case: tuple[DataType, ByteOrder, Scalar, list[int]]) -> str:
    return f"{case[0]}-{case[1]}-{case[2]!r}"


def test_reference_float32_pattern() -> None:
    """The brief's example: float32 123.456 as ABCD is 0x42F6 0xE979."""
    assert encode(ValueSpec("float32", "ABCD"), 123.456) == [0x42F6, 0xE979]
    assert encode(ValueSpec("float32", "DCBA"), 123.456) == [0x79E9, 0xF642]
    assert decode(ValueSpec("float32", "BADC"), [0xF642, 0x79E9]) == pytest.approx(123.456)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decode_known_pattern(case: tuple[DataType, ByteOrder, Scalar, list[int]]) -> None:
    data_type, order, value, registers = case
    assert decode(ValueSpec(data_type, order), registers) == value


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_encode_known_pattern(case: tuple[DataType, ByteOrder, Scalar, list[int]]) -> None:
    data_type, order, value, registers = case
    assert encode(ValueSpec(data_type, order), value) == registers


ORDERS: list[ByteOrder] = ["ABCD", "BADC", "CDAB", "DCBA"]
ROUND_TRIP: list[tuple[DataType, Scalar]] = [
    ("int16", -12345),
    ("uint16", 65535),
    ("int32", -(1 << 31)),
    ("uint32", (1 << 32) - 1),
    ("int64", -(1 << 63)),
    ("uint64", (1 << 64) - 1),
    ("float32", -0.25),
    ("float64", math.pi),
    ("float64", -1e300),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("data_type", "value"), ROUND_TRIP)
def test_round_trip(data_type: DataType, value: Scalar, order: ByteOrder) -> None:
    spec = ValueSpec(data_type, order)
    registers = encode(spec, value)
    assert len(registers) == spec.register_count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode(spec, registers) == value


def test_orders_differ_for_32_bit() -> None:
    patterns = {tuple(encode(ValueSpec("uint32", o), 0x11223344)) for o in ORDERS}
    assert len(patterns) == 4


def test_nan_is_a_valid_float() -> None:
    value = decode(ValueSpec("float32", "ABCD"), [0x7FC0, 0x0000])
    assert isinstance(value, float)
    assert math.isnan(value)


@pytest.mark.parametrize(
    ("bit", "register", "expected"),
    [
        (0, 0x0001, True),
        (0, 0xFFFE, False),
        (15, 0x8000, True),
        (7, 0x0080, True),
        (8, 0x0080, False),
    ],
)
def test_bit(bit: int, register: int, expected: bool) -> None:
    assert decode(ValueSpec("bit", bit=bit), [register]) is expected


def test_bit_encode_sets_only_its_bit() -> None:
    assert encode(ValueSpec("bit", bit=9), True) == [0x0200]
    assert encode(ValueSpec("bit", bit=9), False) == [0]


def test_bool() -> None:
    assert decode(ValueSpec("bool"), [True]) is True
    assert decode(ValueSpec("bool"), [0]) is False
    assert encode(ValueSpec("bool"), True) == [1]


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        ("ABCD", [0x4142, 0x4300]),  # "AB", "C\0": high byte first
        ("CDAB", [0x4142, 0x4300]),  # word order never applies to strings
        ("BADC", [0x4241, 0x0043]),  # low byte first
        ("DCBA", [0x4241, 0x0043]),
    ],
)
def test_string_byte_order(order: ByteOrder, registers: list[int]) -> None:
    spec = ValueSpec("string", order, length=2)
    assert encode(spec, "ABC") == registers
    assert decode(spec, registers) == "ABC"


def test_string_strips_trailing_nul_and_spaces() -> None:
    spec = ValueSpec("string", "ABCD", length=3)
    assert decode(spec, [0x4F4B, 0x2020, 0x0000]) == "OK"
    assert decode(spec, [0x4120, 0x4200, 0x0000]) == "A B"


def test_string_encode_errors() -> None:
    spec = ValueSpec("string", "ABCD", length=1)
    with pytest.raises(CodecError, match="longer than 2"):
        encode(spec, "ABC")
    with pytest.raises(CodecError, match="not ASCII"):
        encode(spec, "é")


def test_non_ascii_string_is_a_failure_not_an_exception_in_a_block() -> None:
    spec = ValueSpec("string", "ABCD", length=1)
    result = decode_block([(0, spec), (1, ValueSpec("uint16"))], [0xC3A9, 7])
    assert isinstance(result[0], DecodeFailure)
    assert "not ASCII" in result[0].reason
    assert result[1] == 7
    with pytest.raises(CodecError, match="not ASCII"):
        decode(spec, [0xC3A9])


@pytest.mark.parametrize(
    ("data_type", "value"),
    [("int16", 40000), ("uint16", -1), ("uint32", 1 << 32), ("int64", 1 << 63), ("float32", 1e39)],
)
def test_encode_out_of_range(data_type: DataType, value: Scalar) -> None:
    with pytest.raises(CodecError, match="does not fit"):
        encode(ValueSpec(data_type), value)


def test_encode_rejects_fractional_integer_and_text() -> None:
    with pytest.raises(CodecError, match="needs an integer"):
        encode(ValueSpec("int16"), 1.5)
    with pytest.raises(CodecError, match="got string"):
        encode(ValueSpec("int16"), "7")


def test_spec_validation() -> None:
    with pytest.raises(CodecError, match="bit number"):
        ValueSpec("bit")
    with pytest.raises(CodecError, match="length"):
        ValueSpec("string")


def test_block_decoder_mixed_orders_and_offsets() -> None:
    items = [
        (0, ValueSpec("float32", "CDAB")),
        (2, ValueSpec("int16", "ABCD")),
        (2, ValueSpec("bit", bit=15)),  # overlaps the int16
        (3, ValueSpec("uint32", "DCBA")),
        (5, ValueSpec("string", "BADC", length=1)),
    ]
    words = [
        *encode(ValueSpec("float32", "CDAB"), 2.5),
        0x8001,
        *encode(ValueSpec("uint32", "DCBA"), 70000),
        *encode(ValueSpec("string", "BADC", length=1), "Hi"),
    ]
    decoder = BlockDecoder(items)
    assert decoder.decode(words) == [2.5, -32767, True, 70000, "Hi"]
    # reusable: the precompiled decoder gives the same answer again
    assert decoder.decode(words) == [2.5, -32767, True, 70000, "Hi"]


def test_block_decoder_short_block_raises() -> None:
    with pytest.raises(CodecError, match="plan needs 2"):
        BlockDecoder([(0, ValueSpec("float32"))]).decode([1])


def test_register_out_of_range_raises() -> None:
    with pytest.raises(CodecError, match=r"0\.\.65535"):
        decode(ValueSpec("uint16"), [70000])


def test_from_tag_uses_device_order_unless_overridden() -> None:
    plain = ModbusTag(name="a", address=0, type="float32")
    own = ModbusTag(name="b", address=0, type="float32", byte_order="DCBA")
    assert ValueSpec.from_tag(plain, "CDAB").byte_order == "CDAB"
    assert ValueSpec.from_tag(own, "CDAB").byte_order == "DCBA"
    assert (
        ValueSpec.from_tag(ModbusTag(name="s", address=0, type="string", length=4)).register_count
        == 4
    )


# ------------------------------------------------------------ decode_bytes (the driver's path)

# Every numeric register type and byte order the config accepts (from its own Literals,
# so a new type is covered without editing this list).
_NUMBER_TYPES: list[DataType] = [
    t for t in get_args(DataType) if t not in ("bool", "bit", "string")
]
_ORDERS: list[ByteOrder] = list(get_args(ByteOrder))


@st.composite
def _blocks(draw: st.DrawFn) -> tuple[list[tuple[int, ValueSpec]], list[int]]:
    """A block of values at increasing offsets (gaps allowed), in any item order,
    sometimes with a string, a bit or two values sharing registers (the slow path)."""
    items: list[tuple[int, ValueSpec]] = []
    offset = draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from([*_NUMBER_TYPES, "string", "bit"]))
        order = draw(st.sampled_from(_ORDERS))
        if kind == "string":
            spec = ValueSpec("string", order, length=draw(st.integers(1, 3)))
        elif kind == "bit":
            spec = ValueSpec("bit", bit=draw(st.integers(0, 15)))
        else:
            spec = ValueSpec(kind, order)
        items.append((offset, spec))
        offset += spec.register_count + draw(st.sampled_from([0, 0, 1, -1]))
        offset = max(offset, 0)
    order_of = draw(st.permutations(range(len(items))))
    shuffled = [items[i] for i in order_of]
    end = max(o + s.register_count for o, s in items)
    registers = draw(st.lists(st.integers(0, 0xFFFF), min_size=end, max_size=end + 2))
    return shuffled, registers


@given(_blocks())
@settings(max_examples=300, deadline=None)
def test_decode_bytes_equals_decode_of_the_registers(
    block: tuple[list[tuple[int, ValueSpec]], list[int]],
) -> None:
    items, registers = block
    decoder = BlockDecoder(items)
    expected = decoder.decode(registers)
    got = list(decoder.decode_bytes(struct.pack(f">{len(registers)}H", *registers)))
    # repr: NaN == NaN, and -0.0 apart from 0.0
    assert [repr(v) for v in got] == [repr(v) for v in expected]


def test_decode_bytes_fast_path_only_for_numbers_that_do_not_overlap() -> None:
    fast = BlockDecoder([(2, ValueSpec("float32", "CDAB")), (0, ValueSpec("int16"))])
    assert fast.numbers_only
    assert list(fast.decode_bytes(bytes.fromhex("fffe 0000 0000 3f80"))) == [1.0, -2]
    shared = BlockDecoder([(0, ValueSpec("uint32")), (1, ValueSpec("uint16"))])
    assert not shared.numbers_only
    text = BlockDecoder([(0, ValueSpec("string", length=1))])
    assert not text.numbers_only
    assert list(text.decode_bytes(b"\xff\x00")) == [DecodeFailure("string is not ASCII: b'\\xff'")]


@pytest.mark.parametrize("data", [b"", b"\x00\x01\x02"])
def test_decode_bytes_refuses_a_short_or_odd_block(data: bytes) -> None:
    with pytest.raises(CodecError, match="the plan needs 2"):
        BlockDecoder([(0, ValueSpec("uint32"))]).decode_bytes(data)
