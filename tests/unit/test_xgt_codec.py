"""XGT FEnet frames and values, checked against the frame examples of LS ELECTRIC's manual.

Source of every example: LS ELECTRIC "XGT FEnet I/F Module" user manual (XGL-EFMT/EFMTB,
XGL-EFMF), chapter 8 "Dedicated Protocol Communication": 8.1.2 (header structure), 8.2.1
(read individual direct variable), 8.2.2 (read continuous direct variable), 8.2.4 (write
continuous direct variable), and chapter 10.4.1 (communication error codes). The manual
prints words as "h0054"; on the wire they are little-endian (its own note: h0054 → 54 00).
"""

from __future__ import annotations

import struct

import pytest

from drivers.xgt.codec import (
    COMPANY_GLOFA,
    COMPANY_XGT,
    DATA_TYPE,
    DT_CONTINUOUS,
    BlockDecoder,
    CodecError,
    DecodeFailure,
    FrameError,
    NakError,
    ValueSpec,
    bcc,
    continuous_read,
    decode_header,
    encode_frame,
    encode_nak,
    encode_read_response,
    encode_value,
    error_reason,
    individual_read,
    parse_read_request,
    parse_read_response,
)


def words(*values: int) -> bytes:
    """Manual notation h0054 h0002 ... → the little-endian bytes on the wire."""
    return b"".join(struct.pack("<H", v) for v in values)


# ---------------------------------------------------------------- header (8.1.2)


def test_company_id_is_the_manuals_ascii() -> None:
    # 8.1.2: "LSIS-XGT" + NULL NULL = 4C 53 49 53 2D 58 47 54 00 00; LGIS-GLOFA for GM/MK.
    assert bytes.fromhex("4C5349532D5847540000") == COMPANY_XGT
    assert bytes.fromhex("4C4749532D474C4F4641") == COMPANY_GLOFA


def test_request_header_fields_and_bcc() -> None:
    instruction = individual_read(["%MW100"], "W")
    frame = encode_frame(instruction, invoke_id=0x1234, cpu_info=0xA0, position=0x13)
    head = frame[:20]
    assert head[:10] == COMPANY_XGT
    assert head[10:12] == b"\x00\x00"  # PLC info: client -> server "don't care"
    assert head[12] == 0xA0  # CPU info XGK (XGI 0xA4, XGR 0xA8)
    assert head[13] == 0x33  # source of frame: client -> server
    assert head[14:16] == b"\x34\x12"  # invoke id, little-endian
    assert head[16:18] == struct.pack("<H", len(instruction))  # length of the instruction
    assert head[18] == 0x13  # FEnet position: base 1, slot 3
    assert head[19] == sum(head[:19]) & 0xFF  # BCC: byte sum of the header
    assert frame[20:] == instruction
    header = decode_header(frame)
    assert (header.invoke_id, header.length, header.bcc_ok) == (0x1234, len(instruction), True)


def test_header_bcc_zero_is_accepted_other_wrong_values_are_not() -> None:
    frame = bytearray(encode_frame(b"\x00" * 8, invoke_id=1, cpu_info=0xA0))
    frame[19] = 0
    assert decode_header(bytes(frame)).bcc_ok
    frame[19] = (bcc(bytes(frame)) + 1) & 0xFF
    assert not decode_header(bytes(frame)).bcc_ok


def test_header_with_a_foreign_company_id_is_refused() -> None:
    frame = b"MODBUS-TCP" + bytes(10)
    with pytest.raises(FrameError, match="company id"):
        decode_header(frame)
    with pytest.raises(FrameError, match="short header"):
        decode_header(COMPANY_XGT)


def test_plc_info_of_an_answer() -> None:
    # 8.1.2: bits 0-5 CPU type, bit 7 CPU error, bits 8-12 status (1 RUN, 2 STOP, 4 ERROR).
    frame = encode_frame(b"", invoke_id=0, cpu_info=0xA0, source=0x11, plc_info=0x0281)
    header = decode_header(frame)
    assert header.system_status == "STOP"
    assert header.cpu_error


# ---------------------------------------------------------------- 8.2.1 individual read


def test_individual_read_request_is_the_manuals_example() -> None:
    # 8.2.1 request: h0054 h0002 h0000 h0001 h0006 %MW100
    expected = words(0x0054, 0x0002, 0x0000, 0x0001, 0x0006) + b"%MW100"
    assert individual_read(["%MW100"], "W") == expected
    parsed = parse_read_request(expected)
    assert (parsed.data_type, parsed.names, parsed.count) == (0x0002, ("%MW100",), 0)


def test_individual_read_ack_is_the_manuals_example() -> None:
    # 8.2.1 ACK: h0055 h0002 h0000 h0000 h0001 h0002 h1234 (one block, 2 bytes, value h1234)
    ack = words(0x0055, 0x0002, 0x0000, 0x0000, 0x0001, 0x0002, 0x1234)
    assert encode_read_response(0x0002, [struct.pack("<H", 0x1234)]) == ack
    response = parse_read_response(ack, 0x0002, [2])
    assert response.error_status == 0
    assert response.blocks == (b"\x34\x12",)
    assert BlockDecoder([(0, ValueSpec("uint16"))]).decode(response.blocks[0]) == [0x1234]


def test_individual_read_nak_is_the_manuals_example() -> None:
    # 8.2.1 NAK: h0055 h0002 h0000 hFFFF h21 (1-byte code in this edition) ...
    nak = words(0x0055, 0x0002, 0x0000, 0xFFFF) + b"\x21"
    response = parse_read_response(nak, 0x0002, [2])
    assert (response.error_status, response.error_code, response.blocks) == (0xFFFF, 0x21, ())
    # ... 10.4.1: h0055 h0002 h0000 hFFFF h0004 (2-byte code): beyond the device area.
    nak2 = words(0x0055, 0x0002, 0x0000, 0xFFFF, 0x0004)
    assert encode_nak(0x0055, 0x0002, 0x0004) == nak2
    assert parse_read_response(nak2, 0x0002, [2]).error_code == 4
    assert error_reason(4) == "xgt error 0x0004 (address beyond the device area)"
    # 8.2.1 response table: "If Error State is abnormal, the lower Byte is the error code".
    upper_set = words(0x0055, 0x0002, 0x0000, 0xFFFF, 0x0104)
    assert parse_read_response(upper_set, 0x0002, [2]).error_code == 4


def test_individual_read_of_sixteen_variables_and_no_more() -> None:
    names = [f"%MW{i}" for i in range(16)]
    body = individual_read(names, "W")
    assert parse_read_request(body).names == tuple(names)
    with pytest.raises(CodecError, match="1-16"):
        individual_read([*names, "%MW16"], "W")
    # A PLC refuses 17 blocks with error 1 (10.4.1).
    seventeen = words(0x0054, 0x0002, 0, 17) + b"".join(words(6) + n.encode() for n in names)
    with pytest.raises(NakError) as info:
        parse_read_request(seventeen)
    assert info.value.code == 0x01


def test_bit_answer_is_one_byte_00_or_01() -> None:
    # 8.2.1 note: a bit reads as one byte, h00 or h01.
    ok = encode_read_response(0x0000, [b"\x01", b"\x00"])
    assert parse_read_response(ok, 0x0000, [1, 1]).blocks == (b"\x01", b"\x00")
    bad = encode_read_response(0x0000, [b"\x02"])
    with pytest.raises(FrameError, match="neither 00 nor 01"):
        parse_read_response(bad, 0x0000, [1])


# ---------------------------------------------------------------- 8.2.2 continuous read


def test_continuous_read_request_is_the_manuals_example() -> None:
    # 8.2.2 request: h0054 h0014 h0000 h0001 h0006 %MB100 h0006 (6 bytes from %MB100)
    expected = words(0x0054, 0x0014, 0x0000, 0x0001, 0x0006) + b"%MB100" + words(0x0006)
    assert continuous_read("%MB100", 6) == expected
    parsed = parse_read_request(expected)
    assert (parsed.data_type, parsed.names, parsed.count) == (DT_CONTINUOUS, ("%MB100",), 6)


def test_continuous_read_ack_is_the_manuals_example() -> None:
    # 8.2.2 ACK: h0055 h0014 h0000 h0000 h0001 h0006 h0123456789AB (6 data bytes)
    data = bytes.fromhex("0123456789AB")
    ack = words(0x0055, 0x0014, 0x0000, 0x0000, 0x0001, 0x0006) + data
    assert encode_read_response(DT_CONTINUOUS, [data]) == ack
    assert parse_read_response(ack, DT_CONTINUOUS, [6]).blocks == (data,)


def test_continuous_read_nak_is_the_manuals_example() -> None:
    # 8.2.2 NAK: h0055 h0014 h0000 hFFFF h21
    nak = words(0x0055, 0x0014, 0x0000, 0xFFFF) + b"\x21"
    assert parse_read_response(nak, DT_CONTINUOUS, [6]).error_code == 0x21


def test_continuous_read_is_capped_at_1400_bytes() -> None:
    # 8.2.2: "Data Size in byte whose Maximum value is 1400 (h0578)".
    assert continuous_read("%MB0", 1400).endswith(words(0x0578))
    with pytest.raises(CodecError, match="1-1400"):
        continuous_read("%MB0", 1401)
    too_big = words(0x0054, 0x0014, 0, 1, 4) + b"%MB0" + words(1401)
    with pytest.raises(NakError) as info:
        parse_read_request(too_big)
    assert info.value.code == 0x05


def test_write_request_of_the_manual_is_refused_by_a_read_only_plc() -> None:
    # 8.2.4 write continuous: h0058 h0014 h0000 h0001 h0006 %MB100 h0002 h1234
    write = words(0x0058, 0x0014, 0x0000, 0x0001, 0x0006) + b"%MB100" + words(0x0002, 0x1234)
    with pytest.raises(NakError) as info:
        parse_read_request(write)
    assert info.value.code == 0x78


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (words(0x0054, 0x0002, 0, 1), 0x76),  # a block announced, none present
        (words(0x0054, 0x0002, 0, 1, 6) + b"%MW1", 0x76),  # name shorter than its length
        (words(0x0054, 0x0002, 0, 1, 6) + b"%MW100" + b"\x00", 0x76),  # trailing byte
        (words(0x0054, 0x0007, 0, 1, 6) + b"%MW100", 0x02),  # data type 7
        (words(0x0054, 0x0014, 0, 2, 4) + b"%MB0", 0x01),  # continuous with 2 blocks
        (words(0x0054, 0x0002, 0, 0), 0x01),  # no block
    ],
)
def test_malformed_requests_get_the_manuals_codes(body: bytes, code: int) -> None:
    with pytest.raises(NakError) as info:
        parse_read_request(body)
    assert info.value.code == code


# ---------------------------------------------------------------- answers that do not fit


def _ack(*fields: int, data: bytes = b"") -> bytes:
    return words(*fields) + data


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_ack(0x0059, 0x0002, 0, 0, 1, 2, 0x1234), "wrong command"),
        (_ack(0x0055, 0x0003, 0, 0, 1, 2, 0x1234), "wrong data type"),
        (_ack(0x0055, 0x0002, 0, 0, 2, 2, 0x1234), "wrong block count"),
        (_ack(0x0055, 0x0002, 0, 0, 1, 4, 0x1234, 0), "wrong data size"),
        (_ack(0x0055, 0x0002, 0, 0, 1, 2) + b"\x34", "ends inside a block"),
        (_ack(0x0055, 0x0002, 0, 0, 1, 2, 0x1234) + b"\x00", "unexpected bytes"),
        (_ack(0x0055, 0x0002, 0, 0xFFFF) + b"\x00\x00\x00", "NAK with a 3-byte"),
        (_ack(0x0055, 0x0002), "too short"),
    ],
)
def test_answers_that_do_not_fit_the_request_are_frame_errors(body: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_read_response(body, 0x0002, [2])


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("data_type", "value", "raw"),
    [
        ("int8", -2, b"\xfe"),
        ("uint8", 200, b"\xc8"),
        ("int16", -1234, struct.pack("<h", -1234)),
        ("uint16", 0x1234, b"\x34\x12"),
        ("int32", -123456789, struct.pack("<i", -123456789)),
        ("uint32", 0x12345678, b"\x78\x56\x34\x12"),  # low word first, as XGT memory
        ("int64", -(1 << 40), struct.pack("<q", -(1 << 40))),
        ("uint64", 1 << 63, struct.pack("<Q", 1 << 63)),
        ("float32", 1.5, struct.pack("<f", 1.5)),
        ("float64", -273.15, struct.pack("<d", -273.15)),
    ],
)
def test_values_are_little_endian(data_type: str, value: float, raw: bytes) -> None:
    spec = ValueSpec(data_type)  # type: ignore[arg-type]
    assert encode_value(spec, value) == raw
    assert BlockDecoder([(0, spec)]).decode(raw) == [value]


def test_bits_strings_and_offsets_in_one_block() -> None:
    data = bytes([0b0000_0100, 0x80]) + b"AB\x00\x00" + struct.pack("<H", 7)
    decoder = BlockDecoder(
        [
            (0, ValueSpec("bool", bit=2)),
            (0, ValueSpec("bit", bit=15)),  # bit 15 of the word at byte 0 = bit 7 of byte 1
            (0, ValueSpec("bool", bit=3)),
            (2, ValueSpec("string", length=4)),
            (6, ValueSpec("uint16")),
        ]
    )
    assert decoder.decode(data) == [True, True, False, "AB", 7]
    with pytest.raises(CodecError, match="the plan needs 8"):
        decoder.decode(data[:7])


def test_non_ascii_string_is_a_decode_failure_not_a_value() -> None:
    (value,) = BlockDecoder([(0, ValueSpec("string", length=2))]).decode(b"\xff\xfe")
    assert isinstance(value, DecodeFailure)


@pytest.mark.parametrize(
    ("data_type", "value"),
    [("int16", 40000), ("uint8", -1), ("uint16", 1.5), ("int32", "x"), ("string", 5)],
)
def test_values_that_do_not_fit_are_refused(data_type: str, value: object) -> None:
    spec = ValueSpec(data_type, length=2)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        encode_value(spec, value)  # type: ignore[arg-type]


def test_data_type_codes_are_the_manuals() -> None:
    # 8.2 data type table: bit h0000, byte h0001, word h0002, dword h0003, lword h0004,
    # continuous h0014.
    assert DATA_TYPE == {"X": 0, "B": 1, "W": 2, "D": 3, "L": 4}
    assert DT_CONTINUOUS == 0x14
