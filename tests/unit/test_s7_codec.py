"""S7 codec: frames byte for byte (from the well-known captures and python-snap7's own
builder), answers checked against their request, values of every type."""

from __future__ import annotations

import struct
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.s7 import codec
from drivers.s7.codec import CodecError, FrameError, HeaderError, ItemResult, ReadItem, ValueSpec

H = bytes.fromhex


def test_connection_request_rack0_slot2() -> None:
    # The CR every S7 client sends to an S7-300 at rack 0, slot 2 (TPDU size 1024).
    assert codec.cotp_connect_request(0x0100, 0x0102) == H(
        "0300 0016 11 e0 0000 0001 00 c0010a c1020100 c2020102"
    )


def test_setup_communication_pdu_480() -> None:
    assert codec.cotp_data(codec.setup_request(0, 480)) == H(
        "0300 0019 02f080 32 01 0000 0000 0008 0000 f0 00 0001 0001 01e0"
    )


def test_read_request_db1_dbw2_and_mb10() -> None:
    items = [ReadItem(0x84, 1, 2, 2), ReadItem(0x83, 0, 10, 1)]
    assert codec.read_request(7, items) == H(
        "32 01 0000 0007 001a 0000 04 02120a10 02 0002 0001 84 000010120a10 02 0001 0000 83 000050"
    )


def test_read_request_matches_python_snap7s_builder() -> None:
    s7protocol = pytest.importorskip("snap7.s7protocol", reason="python-snap7 is not installed")
    datatypes = pytest.importorskip("snap7.datatypes")
    proto = s7protocol.S7Protocol()
    theirs = proto.build_read_request(
        area=datatypes.S7Area.DB,
        db_number=5,
        start=300,
        word_len=datatypes.S7WordLen.BYTE,
        count=40,
    )
    ref = int.from_bytes(theirs[4:6], "big")
    assert codec.read_request(ref, [ReadItem(0x84, 5, 300, 40)]) == theirs


def answer(ref: int, items: list[bytes | int], *, error: int = 0) -> bytes:
    data = bytearray()
    for i, item in enumerate(items):
        if isinstance(item, int):
            data += bytes((item, 0, 0, 0))
        else:
            data += b"\xff\x04" + struct.pack(">H", 8 * len(item)) + item
            if len(item) % 2 and i < len(items) - 1:
                data += b"\x00"
    return codec.ack_data(ref, bytes((4, len(items))), bytes(data), error)


ITEMS = [ReadItem(0x84, 1, 0, 3), ReadItem(0x84, 2, 0, 2), ReadItem(0x83, 0, 0, 1)]


def test_answer_with_fill_bytes_and_a_refused_item() -> None:
    pdu = answer(9, [b"\x01\x02\x03", 0x0A, b"\x07"])
    assert codec.parse_read_response(pdu, 9, ITEMS) == [
        ItemResult(0xFF, b"\x01\x02\x03"),
        ItemResult(0x0A, b""),
        ItemResult(0xFF, b"\x07"),
    ]
    assert codec.read_response_size([3, 0, 1]) == len(pdu)  # a fill byte after item 1 only


def test_fill_byte_after_an_odd_last_item_is_accepted_nothing_else() -> None:
    items = [ReadItem(0x84, 1, 0, 3)]
    padded = codec.ack_data(2, b"\x04\x01", b"\xff\x04\x00\x18\x01\x02\x03\x00")
    assert codec.parse_read_response(padded, 2, items) == [ItemResult(0xFF, b"\x01\x02\x03")]
    for tail in (b"\x07", b"\x00\x00"):
        pdu = codec.ack_data(2, b"\x04\x01", b"\xff\x04\x00\x18\x01\x02\x03" + tail)
        with pytest.raises(FrameError, match="unexpected data"):
            codec.parse_read_response(pdu, 2, items)


def test_bit_transport_size_and_octet_string() -> None:
    items = [ReadItem(0x84, 1, 0, 1), ReadItem(0x84, 1, 0, 2)]
    data = b"\xff\x03\x00\x08\x01\x00" + b"\xff\x09\x00\x02\xab\xcd"
    pdu = codec.ack_data(1, b"\x04\x02", data)
    assert codec.parse_read_response(pdu, 1, items) == [
        ItemResult(0xFF, b"\x01"),
        ItemResult(0xFF, b"\xab\xcd"),
    ]


def test_put_get_refusal_is_a_header_error_with_the_fix() -> None:
    # As S7-1200/1500 answer without PUT/GET: an ack (type 2) with class 0x81 code 0x04.
    pdu = H("32 02 0000 0003 0000 0000 8104")
    with pytest.raises(HeaderError) as info:
        codec.parse_read_response(pdu, 3, ITEMS[:1])
    assert info.value.code == 0x8104
    assert "Permit access with PUT/GET communication from remote partner" in str(info.value)


@pytest.mark.parametrize(
    ("pdu", "ref", "reason"),
    [
        (answer(1, [b"\x01\x02\x03", 0x0A, b"\x07"]), 2, "wrong PDU reference"),
        (answer(1, [b"\x01\x02\x03", 0x0A]), 1, "wrong item count"),
        (answer(1, [b"\x01\x02\x03", 0x0A, b"\x07"]) + b"\x00", 1, "wrong S7 length"),
        (answer(1, [b"\x01\x02", 0x0A, b"\x07"]), 1, "wrong item length"),
        (H("33") + answer(1, [b"\x01"])[1:], 1, "not an S7 PDU"),
        (H("32 03 0000 0001"), 1, "short S7 header"),
        (codec.ack_data(1, b"\x05\x03", b""), 1, "not a read-variable answer"),
    ],
)
def test_inconsistent_answers_raise_frame_errors(pdu: bytes, ref: int, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        codec.parse_read_response(pdu, ref, ITEMS)
    assert info.value.reason == f"protocol error: {reason}"


def test_item_reasons() -> None:
    assert codec.item_reason(0x05) == "s7 item 0x05 (address out of range)"
    assert codec.item_reason(0x0A) == "s7 item 0x0A (object does not exist)"
    assert codec.item_reason(0x42) == "s7 item 0x42 (unknown return code)"
    assert codec.header_error_reason(0x1234) == "s7 error 0x1234 (unknown error)"


def test_setup_answer() -> None:
    pdu = codec.ack_data(4, H("f000 0001 0001 00f0"))
    assert codec.parse_setup_response(pdu, 4) == 240
    with pytest.raises(FrameError, match="not a setup-communication answer"):
        codec.parse_setup_response(codec.ack_data(4, H("0401")), 4)


def test_cotp_confirm_and_refusal() -> None:
    cr = codec.cotp_connect_request(0x0100, 0x0101)[4:]
    assert codec.parse_cotp_connect(cr) == (0x0100, 0x0101)
    codec.cotp_confirm(codec.cotp_connect_confirm(cr)[4:])
    with pytest.raises(FrameError, match="check rack/slot or TSAPs"):
        codec.cotp_confirm(codec.cotp_disconnect(cr)[4:])


@given(st.binary(max_size=80), st.integers(0, 0xFFFF))
def test_garbage_never_parses_into_values_of_another_shape(data: bytes, ref: int) -> None:
    try:
        results = codec.parse_read_response(data, ref, ITEMS)
    except (FrameError, HeaderError):
        return
    assert len(results) == len(ITEMS)
    for item, result in zip(ITEMS, results, strict=True):
        assert (result.code == 0xFF and len(result.data) == item.count) or (
            result.code != 0xFF and result.data == b""
        )


@given(st.integers(0, 60))
def test_every_truncation_of_a_good_answer_is_refused(cut: int) -> None:
    pdu = answer(1, [b"\x01\x02\x03", 0x0A, b"\x07"])
    if cut >= len(pdu):
        return
    with pytest.raises(FrameError):
        codec.parse_read_response(pdu[:cut], 1, ITEMS)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("spec", "raw", "value"),
    [
        (ValueSpec("bool", 3), b"\x08", True),
        (ValueSpec("bool", 2), b"\x08", False),
        (ValueSpec("byte"), b"\xc8", 200),
        (ValueSpec("int"), b"\xfb\x2e", -1234),
        (ValueSpec("word"), b"\xd4\x31", 54321),
        (ValueSpec("dint"), b"\xf8\xa4\x32\xeb", -123456789),
        (ValueSpec("dword"), b"\xb2\xd0\x5e\x00", 3_000_000_000),
        (ValueSpec("real"), b"\x3f\xc0\x00\x00", 1.5),
        (ValueSpec("lreal"), H("c0c34a4587e7c06e"), -9876.54321),
        (ValueSpec("string", length=6), b"\x06\x03ABC\x00\x00\x00", "ABC"),
        (ValueSpec("date_and_time"), H("2612010815301233"), "2026-12-01T08:15:30.123"),
        (ValueSpec("date_and_time"), H("9901010000000006"), "1999-01-01T00:00:00.000"),
    ],
)
def test_values(spec: ValueSpec, raw: bytes, value: object) -> None:
    assert codec.decode(spec, raw, 0) == value
    if spec.data_type != "bool":
        assert codec.encode(spec, value) == raw


@pytest.mark.parametrize(
    ("spec", "raw", "message"),
    [
        (ValueSpec("string", length=4), b"\x04\x05ABCD", "says 5 characters of at most 4"),
        (ValueSpec("string", length=4), b"\x10\x08ABCD", "says 8 characters of at most 16"),
        (ValueSpec("date_and_time"), H("2613010815301233"), "invalid DATE_AND_TIME"),
        (ValueSpec("date_and_time"), H("2A12010815301233"), "is not BCD"),
        (ValueSpec("date_and_time"), H("2612010815301230"), "weekday"),
        (ValueSpec("dint"), b"\x00\x01", "needs 4 bytes at 0, have 2"),
    ],
)
def test_invalid_bytes_are_refused_not_decoded(spec: ValueSpec, raw: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.decode(spec, raw, 0)


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2089, 12, 31, 23, 59)))
def test_date_and_time_round_trip(value: datetime) -> None:
    text = value.replace(microsecond=value.microsecond // 1000 * 1000).isoformat(
        timespec="milliseconds"
    )
    raw = codec.encode(ValueSpec("date_and_time"), text)
    assert codec.decode(ValueSpec("date_and_time"), raw, 0) == text
    assert raw[7] & 0x0F == value.isoweekday() % 7 + 1  # 1 = Sunday


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=12))
def test_string_round_trip(text: str) -> None:
    spec = ValueSpec("string", length=12)
    assert codec.decode(spec, codec.encode(spec, text), 0) == text


def test_encode_refuses_out_of_range() -> None:
    with pytest.raises(CodecError, match="out of range for int"):
        codec.encode(ValueSpec("int"), 40000)
    with pytest.raises(CodecError, match="integer"):
        codec.encode(ValueSpec("word"), 1.5)
