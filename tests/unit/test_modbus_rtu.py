"""Modbus RTU framing and line timing (drivers/modbus/rtu.py, drivers/links.LineTiming)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU

from drivers.links import LineTiming
from drivers.modbus.rtu import (
    FRAME_INCOMPLETE,
    FRAME_OK,
    check_rtu_frame,
    crc16,
    encode_answer,
    exchange_s,
    parse_answer,
    read_request,
    response_size,
    with_crc,
)


def test_crc_of_the_specification_example() -> None:
    # Read 10 holding registers of unit 1: the frame every Modbus manual shows.
    assert read_request(1, 3, 0, 10) == bytes.fromhex("01030000000AC5CD")


@given(st.binary(max_size=256))
def test_crc_agrees_with_pymodbus(data: bytes) -> None:
    theirs = FramerRTU.compute_CRC(data).to_bytes(2, "big")
    assert crc16(data).to_bytes(2, "little") == theirs


def test_read_request_refuses_what_is_not_a_read() -> None:
    with pytest.raises(ValueError, match="function code 6 is not a read"):
        read_request(1, 6, 0, 1)
    with pytest.raises(ValueError, match="bad read request"):
        read_request(1, 3, 0, 0)


REQ = read_request(7, 3, 100, 2)
GOOD = encode_answer(REQ, [0x1234, 0xABCD])


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (GOOD, FRAME_OK),
        (encode_answer(REQ, None, exception=2), FRAME_OK),
        (b"", FRAME_INCOMPLETE),
        (GOOD[:1], FRAME_INCOMPLETE),
        (GOOD[:6], FRAME_INCOMPLETE),
        (GOOD[:-1], FRAME_INCOMPLETE),
        (b"\x08" + GOOD[1:], "protocol error: wrong unit id"),
        (b"\x07\x04", "protocol error: wrong function code"),
        (b"\x07\x83\x02", FRAME_INCOMPLETE),
        (b"\x07\x03\x02", "protocol error: wrong byte count"),
        (GOOD + b"\x00", "protocol error: unexpected data"),
        (GOOD[:-1] + bytes((GOOD[-1] ^ 1,)), "crc error"),
        (GOOD[:3] + b"\x13" + GOOD[4:], "crc error"),
        (with_crc(b"\x07\x83\x02")[:-1] + b"\x00", "crc error"),
    ],
    ids=[
        "values",
        "exception",
        "empty",
        "unit-only",
        "header-and-part",
        "missing-crc-byte",
        "wrong-unit",
        "wrong-function",
        "exception-partial",
        "short-byte-count",
        "trailing-byte",
        "bad-crc",
        "flipped-data",
        "exception-bad-crc",
    ],
)
def test_check_rtu_frame(data: bytes, verdict: str) -> None:
    assert check_rtu_frame(data, REQ) == verdict


def test_parse_registers_bits_and_exceptions() -> None:
    assert parse_answer(GOOD, REQ) == (None, [0x1234, 0xABCD])
    bits_req = read_request(1, 1, 0, 10)
    bits = [1, 0, 1, 1, 0, 0, 0, 1, 1, 0]
    answer = encode_answer(bits_req, bits)
    assert answer[2:5] == bytes((2, 0b10001101, 0b01))  # LSB first, as the spec packs them
    assert check_rtu_frame(answer, bits_req) == FRAME_OK
    assert parse_answer(answer, bits_req) == (None, bits)
    assert parse_answer(encode_answer(REQ, None, exception=4), REQ) == (4, [])


@given(
    fc=st.sampled_from([1, 2, 3, 4]),
    data=st.data(),
)
def test_answers_round_trip(fc: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 125 if fc in (3, 4) else 2000))
    top = 0xFFFF if fc in (3, 4) else 1
    values = data.draw(st.lists(st.integers(0, top), min_size=count, max_size=count))
    request = read_request(9, fc, 0, count)
    answer = encode_answer(request, values)
    assert len(answer) == response_size(fc, count)
    assert check_rtu_frame(answer, request) == FRAME_OK
    assert parse_answer(answer, request) == (None, values)


@given(
    values=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125),
    data=st.data(),
)
def test_noise_burst_never_passes_as_a_good_frame(values: list[int], data: st.DataObject) -> None:
    """CRC-16 detects every error burst of up to 16 bits: a damaged answer is refused
    (wrong header, byte count or CRC), never decoded into a wrong value."""
    request = read_request(1, 3, 0, len(values))
    answer = bytearray(encode_answer(request, values))
    nbits = 8 * len(answer)
    length = data.draw(st.integers(1, 16))
    start = data.draw(st.integers(0, nbits - length))
    # A burst starts and ends with a flipped bit; the bits between are any.
    pattern = data.draw(st.integers(0, (1 << length) - 1)) | 1 | (1 << (length - 1))
    for k in range(length):
        if pattern >> k & 1:
            pos = start + k
            answer[pos // 8] ^= 1 << (pos % 8)
    assert check_rtu_frame(bytes(answer), request) != FRAME_OK


@given(
    values=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20),
    cut=st.integers(0, 100),
)
def test_a_cut_frame_is_never_good(values: list[int], cut: int) -> None:
    request = read_request(1, 4, 0, len(values))
    answer = encode_answer(request, values)
    part = answer[: min(cut, len(answer) - 1)]
    assert check_rtu_frame(part, request) in (FRAME_INCOMPLETE, "protocol error: wrong byte count")


def test_line_timing() -> None:
    t = LineTiming(9600, "E", 1, 8)
    assert t.bits_per_char == 11
    assert t.char_s == pytest.approx(11 / 9600)
    assert t.silence_s == pytest.approx(3.5 * 11 / 9600)
    assert LineTiming(9600, "N", 1, 8).bits_per_char == 10
    assert LineTiming(9600, "N", 2, 8).bits_per_char == 11
    # Above 19,200 baud the silence is fixed.
    assert LineTiming(19200, "E").silence_s == pytest.approx(3.5 * 11 / 19200)
    assert LineTiming(38400, "E").silence_s == 0.00175
    assert LineTiming(115200, "N").silence_s == 0.00175


def test_exchange_time() -> None:
    t = LineTiming(9600, "E", 1, 8)
    # 10 registers: 8-byte request, 25-byte answer, two silences, 5 ms turnaround.
    expected = 33 * 11 / 9600 + 2 * 3.5 * 11 / 9600 + 0.005
    assert exchange_s(t, 3, 10, 0.005) == pytest.approx(expected)
    # 16 coils: 8-byte request, 7-byte answer.
    assert exchange_s(t, 1, 16) == pytest.approx(15 * 11 / 9600 + 7 * 11 / 9600)
