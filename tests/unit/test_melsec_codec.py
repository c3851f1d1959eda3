"""SLMP binary frames and MELSEC value layout, byte for byte."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.melsec.codec import (
    CodecError,
    DecodeFailure,
    Route,
    SlotCodec,
    batch_read_body,
    decode_bit_points,
    encode_bit_points,
    encode_value,
    end_code_reason,
    parse_answer_header,
    random_read_body,
    request_frame,
)


def test_batch_read_of_d100_to_d107_is_the_manual_example() -> None:
    # The SLMP reference manual's batch read example: 8 words from D100, binary 3E,
    # own station, monitoring timer 0x0010.
    frame = request_frame("3e", Route(), 0x0010, 0x0401, 0x0000, batch_read_body(100, 0xA8, 8))
    assert frame.hex(" ").upper() == (
        "50 00 00 FF FF 03 00 0C 00 10 00 01 04 00 00 64 00 00 A8 08 00"
    )


def test_4e_request_carries_the_serial_number() -> None:
    frame = request_frame(
        "4e", Route(1, 2, 0x03E0, 0), 4, 0x0401, 0x0001, batch_read_body(0x1F, 0x9C, 3), 0x1234
    )
    assert frame.hex(" ").upper() == (
        "54 00 34 12 00 00 01 02 E0 03 00 0C 00 04 00 01 04 01 00 1F 00 00 9C 03 00"
    )


def test_random_read_lists_words_before_dwords() -> None:
    body = random_read_body([(0, 0xA8), (0x20, 0x90)], [(1500, 0xA8)])
    assert body.hex(" ").upper() == "02 01 00 00 00 A8 20 00 00 90 DC 05 00 A8"


def test_answer_header_checks_the_subheader() -> None:
    head = parse_answer_header("3e", bytes.fromhex("D000 00FF FF03 00 0400"))
    assert (head.route, head.length, head.serial) == (Route(), 4, 0)
    head = parse_answer_header("4e", bytes.fromhex("D400 3412 0000 0102 E003 00 0200"))
    assert (head.serial, head.route) == (0x1234, Route(1, 2, 0x03E0, 0))
    with pytest.raises(CodecError, match="protocol error: wrong subheader"):
        parse_answer_header("3e", bytes.fromhex("D400 00FF FF03 00 0400"))
    with pytest.raises(CodecError, match="protocol error: wrong subheader"):
        parse_answer_header("4e", bytes.fromhex("D400 3412 0100 0102 E003 00 0200"))


def test_bit_units_pack_the_first_point_in_the_high_nibble() -> None:
    # M100..M107 = on off off on on on off off → 10 01 11 00 (manual's bit-units layout)
    bits = [True, False, False, True, True, True, False, False]
    assert encode_bit_points(bits) == bytes.fromhex("10011100")
    assert decode_bit_points(bytes.fromhex("10011100"), 8) == bits
    assert encode_bit_points([True, True, True]) == bytes.fromhex("1110")
    assert [SlotCodec("point", "bool", i).decode(b"\x10\x01") for i in range(4)] == [
        True,
        False,
        False,
        True,
    ]


def test_words_are_little_endian_and_32_bit_values_low_word_first() -> None:
    # D100 = 0x5678 (low word), D101 = 0x1234 (high word) hold 0x12345678.
    data = bytes.fromhex("7856 3412")
    assert SlotCodec("word", "uint32", 0, size=4).decode(data) == 0x12345678
    assert SlotCodec("word", "uint16", 2).decode(data) == 0x1234
    assert SlotCodec("word", "int16", 0).decode(b"\xff\xff") == -1
    assert SlotCodec("wordbit", "bool", 0, bit=15).decode(b"\x00\x80") is True
    assert SlotCodec("wordbit", "bool", 0, bit=14).decode(b"\x00\x80") is False
    assert encode_value("float32", 1.5) == struct.pack("<f", 1.5)


def test_strings_are_low_byte_first_and_non_ascii_is_a_failure() -> None:
    assert encode_value("string", "ABC", 2) == b"ABC\x00"
    assert SlotCodec("word", "string", 0, size=4).decode(b"ABC\x00") == "ABC"
    assert SlotCodec("word", "string", 0, size=4).decode(b"AB  ") == "AB"
    failure = SlotCodec("word", "string", 0, size=2).decode(b"\xff\x00")
    assert isinstance(failure, DecodeFailure)
    assert failure.reason.startswith("string is not ASCII")


def test_end_codes_are_named() -> None:
    assert end_code_reason(0xC056) == (
        "end code 0xC056 (the read runs past the device's largest address)"
    )
    assert end_code_reason(0x1234) == "end code 0x1234 (unknown end code)"


_INTS = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


@given(st.sampled_from(sorted(_INTS)), st.data())
def test_integers_round_trip(data_type: str, data: st.DataObject) -> None:
    lo, hi = _INTS[data_type]
    value = data.draw(st.integers(lo, hi))
    raw = encode_value(data_type, value)
    assert SlotCodec("word", data_type, 0, size=len(raw)).decode(raw) == value


@given(st.floats(allow_nan=False, width=32), st.floats(allow_nan=True))
def test_floats_round_trip(f32: float, f64: float) -> None:
    assert SlotCodec("word", "float32", 0, size=4).decode(encode_value("float32", f32)) == f32
    back = SlotCodec("word", "float64", 0, size=8).decode(encode_value("float64", f64))
    assert isinstance(back, float)
    assert (math.isnan(back) and math.isnan(f64)) or back == f64


@given(st.lists(st.booleans(), min_size=1, max_size=64))
def test_bit_points_round_trip(bits: list[bool]) -> None:
    assert decode_bit_points(encode_bit_points(bits), len(bits)) == bits
