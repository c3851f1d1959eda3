"""The XGT dedicated protocol over FEnet (TCP 2004): frames and values.

Pure code (only `struct`), shared by the driver and the simulator, written from LS
ELECTRIC's FEnet I/F module manuals (XGL-EFMT/EFMF, chapter "Dedicated Protocol
Communication"; XGB XBL-EMTA, chapter "XGT dedicated protocol"). Every number on the wire
is little-endian ("h0054" in the manual is sent as 54 00).

A frame is a 20-byte Application Header followed by the Application Instruction:

    header   company id (10) "LSIS-XGT\\0\\0" | PLC info (2) | CPU info (1) | source (1)
             0x33 request / 0x11 response | invoke id (2) | length of the instruction (2) |
             FEnet position (1) base<<4 | slot | BCC (1) sum of the 19 bytes before it
    request  command (2) 0x0054 read | data type (2) | reserved (2) | number of blocks (2) |
             per block: name length (2) + name ("%MW100"); continuous read: + count (2)
    write    command (2) 0x0058 | data type (2) | reserved (2) | number of blocks (2) |
             individual: every block's name length + name, then every block's data size
             (2) + data; continuous: name length + name, byte count (2), the bytes
    answer   command (2) 0x0059 | data type (2) | reserved (2) | error status (2) |
             error status 0: number of blocks (2); else the error code as for a read
    response command (2) 0x0055 | data type (2) | reserved (2) | error status (2) |
             error status 0: number of blocks (2), per block: data size (2) + data
             error status non-zero (NAK): error code (2; older modules send 1 byte;
             the code is the lower byte)

Data types: 0x00 bit, 0x01 byte, 0x02 word, 0x03 double word, 0x04 long word (individual
read: up to 16 variables of one data type) and 0x14 continuous (one block of bytes, at most
1,400). A bit variable's data is one byte, 0x00 or 0x01.

The manual calls the BCC byte "Reserved (BCC): Application Header's byte sum"; clients in
the field send 0 there. The simulator accepts 0 or the right sum and refuses anything else
with error 0x77; the driver always sends the sum and checks it in answers (0 accepted).

Values: XGT memory is little-endian and byte-addressed; a block read returns the bytes of
the area, so every value is one `struct.unpack_from('<…')` at its byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from drivers.base import Scalar
from drivers.xgt.config import TYPE_BYTES, DataType

__all__ = [
    "CMD_READ",
    "CMD_READ_ACK",
    "CMD_WRITE",
    "COMPANY_GLOFA",
    "COMPANY_XGT",
    "DATA_TYPE",
    "DT_CONTINUOUS",
    "ERROR_NAMES",
    "HEADER_LEN",
    "MAX_BLOCK_BYTES",
    "MAX_NAME_LEN",
    "MAX_VARIABLES",
    "SOURCE_REQUEST",
    "SOURCE_RESPONSE",
    "BlockDecoder",
    "CodecError",
    "DecodeFailure",
    "FrameError",
    "Header",
    "NakError",
    "ReadRequest",
    "ReadResponse",
    "ValueSpec",
    "WriteRequest",
    "bcc",
    "continuous_read",
    "continuous_write",
    "decode_header",
    "encode_frame",
    "encode_nak",
    "encode_read_response",
    "encode_value",
    "encode_write_response",
    "error_reason",
    "individual_read",
    "individual_write",
    "parse_read_request",
    "parse_read_response",
    "parse_write_request",
    "parse_write_response",
]

COMPANY_XGT: Final = b"LSIS-XGT\x00\x00"
COMPANY_GLOFA: Final = b"LGIS-GLOFA"
HEADER_LEN: Final = 20
SOURCE_REQUEST: Final = 0x33
SOURCE_RESPONSE: Final = 0x11
CMD_READ: Final = 0x0054
CMD_READ_ACK: Final = 0x0055
CMD_WRITE: Final = 0x0058
CMD_WRITE_ACK: Final = 0x0059
DATA_TYPE: Final[dict[str, int]] = {"X": 0x00, "B": 0x01, "W": 0x02, "D": 0x03, "L": 0x04}
DT_CONTINUOUS: Final = 0x14
MAX_BLOCK_BYTES: Final = 1400
MAX_VARIABLES: Final = 16
MAX_NAME_LEN: Final = 16

#: Error codes of a NAK answer (FEnet manual, "Communication error code", status with a
#: communication frame) and the codes its dedicated-protocol examples show (h21).
ERROR_NAMES: Final[dict[int, str]] = {
    0x0001: "more than 16 blocks in an individual read/write",
    0x0002: "data type other than X, B, W, D, L",
    0x0003: "device not served by this CPU",
    0x0004: "address beyond the device area",
    0x0005: "more than 1,400 bytes in one block",
    0x0006: "more than 1,400 bytes in total",
    0x0021: "variable identifier not found",
    0x0022: "address error",
    0x0075: "wrong company id in the frame header",
    0x0076: "wrong length in the frame header",
    0x0077: "wrong checksum (BCC) of the frame header",
    0x0078: "wrong instruction",
}

_U16 = struct.Struct("<H")


def error_reason(code: int) -> str:
    """`xgt error 0x0004 (address beyond the device area)`: the reason of a bad reading."""
    return f"xgt error 0x{code:04X} ({ERROR_NAMES.get(code, 'unknown error')})"


class FrameError(ValueError):
    """Bytes that are not a valid frame of the kind expected (the reason says why)."""


class NakError(Exception):
    """A request a PLC must refuse, with the error code it answers (simulator side)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"{error_reason(code)}{': ' + detail if detail else ''}")
        self.code = code


class CodecError(ValueError):
    """A value cannot be encoded, or bytes cannot be decoded, as its spec says."""


# ------------------------------------------------------------------ header


def bcc(header19: bytes) -> int:
    """The BCC of a header: the byte sum of its first 19 bytes, modulo 256."""
    return sum(header19[:19]) & 0xFF


@dataclass(frozen=True, slots=True)
class Header:
    """The Application Header of a frame."""

    company: bytes
    plc_info: int
    cpu_info: int
    source: int
    invoke_id: int
    length: int
    position: int
    bcc: int
    bcc_ok: bool

    @property
    def cpu_error(self) -> bool:
        """PLC info bit 7: the CPU reports an error (answers only)."""
        return bool(self.plc_info & 0x80)

    @property
    def system_status(self) -> str:
        """PLC info bits 8-12 as a name: RUN, STOP, ERROR, DEBUG (answers only)."""
        status = (self.plc_info >> 8) & 0x1F
        return {1: "RUN", 2: "STOP", 4: "ERROR", 8: "DEBUG"}.get(status, f"0x{status:02X}")


def encode_frame(
    instruction: bytes,
    *,
    invoke_id: int,
    cpu_info: int,
    position: int = 0,
    source: int = SOURCE_REQUEST,
    plc_info: int = 0,
    company: bytes = COMPANY_XGT,
) -> bytes:
    """Header + `instruction`, with the length and the BCC filled in."""
    head = bytearray(company)
    head += struct.pack(
        "<HBBHHB", plc_info, cpu_info, source, invoke_id & 0xFFFF, len(instruction), position
    )
    head.append(bcc(bytes(head)))
    return bytes(head) + instruction


def decode_header(data: bytes) -> Header:
    """The header at the start of `data` (at least 20 bytes). Raises FrameError when the
    company id is not one of LS ELECTRIC's."""
    if len(data) < HEADER_LEN:
        raise FrameError(f"short header: {len(data)} of {HEADER_LEN} bytes")
    company = bytes(data[:10])
    if company not in (COMPANY_XGT, COMPANY_GLOFA):
        raise FrameError(f"wrong company id {company!r}")
    plc_info, cpu_info, source, invoke_id, length, position = struct.unpack_from(
        "<HBBHHB", data, 10
    )
    check = data[19]
    return Header(
        company=company,
        plc_info=plc_info,
        cpu_info=cpu_info,
        source=source,
        invoke_id=invoke_id,
        length=length,
        position=position,
        bcc=check,
        bcc_ok=check in (0, bcc(data)),
    )


# ------------------------------------------------------------------ requests


def _name_bytes(name: str) -> bytes:
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= MAX_NAME_LEN:
        raise CodecError(f"variable name {name!r} must have 1-{MAX_NAME_LEN} characters")
    return _U16.pack(len(raw)) + raw


def individual_read(names: Sequence[str], size: str) -> bytes:
    """The instruction of an individual read of `names` (1-16, all of size letter `size`)."""
    if not 1 <= len(names) <= MAX_VARIABLES:
        raise CodecError(f"an individual read names 1-{MAX_VARIABLES} variables, not {len(names)}")
    body = struct.pack("<HHHH", CMD_READ, DATA_TYPE[size], 0, len(names))
    return body + b"".join(_name_bytes(n) for n in names)


def continuous_read(name: str, count: int) -> bytes:
    """The instruction of a continuous read of `count` bytes from byte variable `name`."""
    if not 1 <= count <= MAX_BLOCK_BYTES:
        raise CodecError(f"a continuous read reads 1-{MAX_BLOCK_BYTES} bytes, not {count}")
    return (
        struct.pack("<HHHH", CMD_READ, DT_CONTINUOUS, 0, 1) + _name_bytes(name) + _U16.pack(count)
    )


def individual_write(items: Sequence[tuple[str, bytes]], size: str) -> bytes:
    """The instruction of an individual write of (variable, data) pairs, all of size
    letter `size` (a bit's data is one byte, 00 or 01)."""
    if not 1 <= len(items) <= MAX_VARIABLES:
        raise CodecError(f"an individual write names 1-{MAX_VARIABLES} variables")
    body = struct.pack("<HHHH", CMD_WRITE, DATA_TYPE[size], 0, len(items))
    body += b"".join(_name_bytes(name) for name, _ in items)
    return body + b"".join(_U16.pack(len(data)) + data for _, data in items)


def continuous_write(name: str, data: bytes) -> bytes:
    """The instruction of a continuous write of `data` from byte variable `name`."""
    if not 1 <= len(data) <= MAX_BLOCK_BYTES:
        raise CodecError(f"a continuous write writes 1-{MAX_BLOCK_BYTES} bytes, not {len(data)}")
    return (
        struct.pack("<HHHH", CMD_WRITE, DT_CONTINUOUS, 0, 1)
        + _name_bytes(name)
        + _U16.pack(len(data))
        + data
    )


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """A write request as a PLC sees it: data type, variable names and their data."""

    data_type: int
    names: tuple[str, ...]
    data: tuple[bytes, ...]


def parse_write_request(body: bytes) -> WriteRequest:
    """Parse a write instruction the way a PLC does; raises NakError with its code (0x01
    block count, 0x02 data type, 0x05 too many bytes, 0x76 a body that does not match its
    own counts)."""
    if len(body) < 8:
        raise NakError(0x76, "instruction shorter than 8 bytes")
    command, data_type, _reserved, blocks = struct.unpack_from("<HHHH", body, 0)
    if command != CMD_WRITE:
        raise NakError(0x78, f"command 0x{command:04X} is not a write")
    if data_type not in (*DATA_TYPE.values(), DT_CONTINUOUS):
        raise NakError(0x02, f"data type 0x{data_type:04X}")
    if data_type == DT_CONTINUOUS and blocks != 1:
        raise NakError(0x01, "a continuous write has exactly one block")
    if not 1 <= blocks <= MAX_VARIABLES:
        raise NakError(0x01, f"{blocks} blocks")
    pos = 8

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(body):
            raise NakError(0x76, f"instruction ends inside {what}")
        out = body[pos : pos + n]
        pos += n
        return out

    names = []
    for _ in range(blocks):
        (size,) = _U16.unpack(take(2, "a name length"))
        if not 1 <= size <= MAX_NAME_LEN:
            raise NakError(0x76, f"variable name length {size}")
        try:
            names.append(take(size, "a name").decode("ascii"))
        except UnicodeDecodeError:
            raise NakError(0x22, "variable name is not ASCII") from None
        if data_type == DT_CONTINUOUS:
            break
    data = []
    for _ in range(blocks):
        (size,) = _U16.unpack(take(2, "a data size"))
        if not 1 <= size <= MAX_BLOCK_BYTES:
            raise NakError(0x05, f"{size} bytes")
        data.append(take(size, "the data"))
    if pos != len(body):
        raise NakError(0x76, f"{len(body) - pos} bytes after the last block")
    return WriteRequest(data_type, tuple(names), tuple(data))


def encode_write_response(data_type: int, blocks: int) -> bytes:
    """The instruction of an ACK answer to a write of `blocks` blocks."""
    return struct.pack("<HHHHH", CMD_WRITE_ACK, data_type, 0, 0, blocks)


def parse_write_response(body: bytes, data_type: int, blocks: int) -> int | None:
    """Check the instruction of an answer to a write: None for an ACK of exactly
    `blocks` blocks, the error code of a NAK. Raises FrameError for anything else (wrong
    command or data type, wrong block count, missing or extra bytes)."""
    if len(body) < 9:
        raise FrameError(f"answer of {len(body)} bytes is too short")
    command, answered_type, _reserved, status = struct.unpack_from("<HHHH", body, 0)
    if command != CMD_WRITE_ACK:
        raise FrameError(f"wrong command 0x{command:04X}")
    if answered_type != data_type:
        raise FrameError(f"wrong data type 0x{answered_type:04X}")
    if status != 0:
        rest = body[8:]
        if len(rest) not in (1, 2):
            raise FrameError(f"NAK with a {len(rest)}-byte error code")
        return rest[0]
    if len(body) != 10:
        raise FrameError(f"ACK of {len(body)} bytes, expected 10")
    (answered,) = _U16.unpack_from(body, 8)
    if answered != blocks:
        raise FrameError(f"wrong block count {answered}, wrote {blocks}")
    return None


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """A read request as a PLC sees it: data type, variable names, byte count (continuous)."""

    data_type: int
    names: tuple[str, ...]
    count: int = 0


def parse_read_request(body: bytes) -> ReadRequest:
    """Parse a request instruction the way a PLC does; raises NakError with the code the
    PLC answers (0x78 for anything but a read, 0x01/0x02/0x05 for limits, 0x76 for a body
    that does not match its own counts)."""
    if len(body) < 8:
        raise NakError(0x76, "instruction shorter than 8 bytes")
    command, data_type, _reserved, blocks = struct.unpack_from("<HHHH", body, 0)
    if command != CMD_READ:
        raise NakError(0x78, f"command 0x{command:04X} is not served (read-only)")
    if data_type not in (*DATA_TYPE.values(), DT_CONTINUOUS):
        raise NakError(0x02, f"data type 0x{data_type:04X}")
    if data_type == DT_CONTINUOUS and blocks != 1:
        raise NakError(0x01, "a continuous read has exactly one block")
    if not 1 <= blocks <= MAX_VARIABLES:
        raise NakError(0x01, f"{blocks} blocks")
    pos = 8
    names = []
    for _ in range(blocks):
        if pos + 2 > len(body):
            raise NakError(0x76, "instruction ends inside a block")
        (size,) = _U16.unpack_from(body, pos)
        pos += 2
        if not 1 <= size <= MAX_NAME_LEN or pos + size > len(body):
            raise NakError(0x76, f"variable name length {size}")
        try:
            names.append(body[pos : pos + size].decode("ascii"))
        except UnicodeDecodeError:
            raise NakError(0x22, "variable name is not ASCII") from None
        pos += size
    count = 0
    if data_type == DT_CONTINUOUS:
        if pos + 2 > len(body):
            raise NakError(0x76, "continuous read without a byte count")
        (count,) = _U16.unpack_from(body, pos)
        pos += 2
        if not 1 <= count <= MAX_BLOCK_BYTES:
            raise NakError(0x05, f"{count} bytes")
    if pos != len(body):
        raise NakError(0x76, f"{len(body) - pos} bytes after the last block")
    return ReadRequest(data_type=data_type, names=tuple(names), count=count)


# ------------------------------------------------------------------ responses


@dataclass(frozen=True, slots=True)
class ReadResponse:
    """A read answer: the blocks' data (error_status 0), or the NAK's error code."""

    data_type: int
    error_status: int
    error_code: int
    blocks: tuple[bytes, ...]


def encode_read_response(data_type: int, blocks: Sequence[bytes]) -> bytes:
    """The instruction of an ACK answer to a read."""
    out = bytearray(struct.pack("<HHHHH", CMD_READ_ACK, data_type, 0, 0, len(blocks)))
    for block in blocks:
        out += _U16.pack(len(block))
        out += block
    return bytes(out)


def encode_nak(command: int, data_type: int, code: int) -> bytes:
    """The instruction of a NAK answer: error status 0xFFFF and a 2-byte error code."""
    return struct.pack("<HHHHH", command, data_type, 0, 0xFFFF, code)


def parse_read_response(body: bytes, data_type: int, sizes: Sequence[int]) -> ReadResponse:
    """Parse and check the instruction of an answer to a read of `data_type` whose blocks
    must hold `sizes` bytes each. Raises FrameError for anything that does not fit exactly:
    wrong command or data type, wrong block count, wrong data size, missing or extra bytes,
    a bit variable whose byte is not 0 or 1. A NAK is not an error: its code is returned."""
    if len(body) < 9:
        raise FrameError(f"answer of {len(body)} bytes is too short")
    command, answered_type, _reserved, status = struct.unpack_from("<HHHH", body, 0)
    if command != CMD_READ_ACK:
        raise FrameError(f"wrong command 0x{command:04X}")
    if answered_type != data_type:
        raise FrameError(f"wrong data type 0x{answered_type:04X}")
    if status != 0:
        rest = body[8:]
        if len(rest) not in (1, 2):  # 2 bytes; older modules send 1
            raise FrameError(f"NAK with a {len(rest)}-byte error code")
        # The manual: "if Error State is abnormal, the lower byte is the error code".
        return ReadResponse(data_type, status, rest[0], ())
    if len(body) < 10:
        raise FrameError(f"answer of {len(body)} bytes is too short")
    (blocks,) = _U16.unpack_from(body, 8)
    if blocks != len(sizes):
        raise FrameError(f"wrong block count {blocks}, asked {len(sizes)}")
    pos = 10
    out = []
    for expected in sizes:
        if pos + 2 > len(body):
            raise FrameError("answer ends inside a block")
        (size,) = _U16.unpack_from(body, pos)
        pos += 2
        if size != expected:
            raise FrameError(f"wrong data size {size}, asked {expected}")
        if pos + size > len(body):
            raise FrameError("answer ends inside a block")
        data = bytes(body[pos : pos + size])
        if data_type == DATA_TYPE["X"] and data not in (b"\x00", b"\x01"):
            raise FrameError(f"bit value {data.hex()} is neither 00 nor 01")
        out.append(data)
        pos += size
    if pos != len(body):
        raise FrameError(f"{len(body) - pos} unexpected bytes after the data")
    return ReadResponse(data_type, 0, 0, tuple(out))


# ------------------------------------------------------------------ values

_STRUCT_CHAR: Final[dict[str, str]] = {
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """Placeholder for a value that could not be decoded (a bad reading)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """How one value sits in bytes: its type, the bit (bool/bit: 0-63 from the value's
    first byte) and the string length in bytes."""

    data_type: DataType
    bit: int = 0
    length: int = 0

    @property
    def byte_count(self) -> int:
        """Bytes the value spans (bool/bit: the bytes up to the one holding its bit)."""
        if self.data_type in ("bool", "bit"):
            return self.bit // 8 + 1
        if self.data_type == "string":
            return self.length
        return TYPE_BYTES[self.data_type]


def encode_value(spec: ValueSpec, value: Scalar) -> bytes:
    """The bytes of a non-bit value (little-endian; strings NUL-padded). Raises CodecError
    when it does not fit the type. Bits are set by the caller (`spec.bit`)."""
    t = spec.data_type
    if t in ("bool", "bit"):
        raise CodecError("bits are set in place, not encoded")
    if t == "string":
        if not isinstance(value, str):
            raise CodecError(f"string value expected, got {value!r}")
        try:
            data = value.encode("ascii")
        except UnicodeEncodeError:
            raise CodecError(f"string {value!r} is not ASCII") from None
        if len(data) > spec.length:
            raise CodecError(f"string {value!r} longer than {spec.length} bytes")
        return data.ljust(spec.length, b"\x00")
    if isinstance(value, str):
        raise CodecError(f"{t} value expected, got string {value!r}")
    char = _STRUCT_CHAR[t]
    number: int | float
    if char in "fd":
        number = float(value)
    else:
        if isinstance(value, float) and not value.is_integer():
            raise CodecError(f"{t} needs an integer, got {value!r}")
        number = int(value)
    try:
        return struct.pack("<" + char, number)
    except (struct.error, OverflowError) as exc:
        raise CodecError(f"{value!r} does not fit {t}: {exc}") from None


_K_STRUCT, _K_BIT, _K_STRING = 0, 1, 2


def _decode_string(raw: bytes) -> Scalar | DecodeFailure:
    text = raw.split(b"\x00", 1)[0].rstrip(b" ")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        return DecodeFailure(f"string is not ASCII: {text!r}")


@dataclass(slots=True)
class BlockDecoder:
    """Decodes every value of one request's data, precompiled once per request.

    `items` are (byte offset in the data, spec) pairs in the order the values are wanted.
    `decode(data)` returns one entry per item: the value or a DecodeFailure. It raises
    CodecError only for data shorter than the plan."""

    items: Sequence[tuple[int, ValueSpec]]
    _slots: list[tuple[int, int, struct.Struct | None, int]] = field(init=False, repr=False)
    _min_len: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        slots: list[tuple[int, int, struct.Struct | None, int]] = []
        min_len = 0
        for offset, spec in self.items:
            min_len = max(min_len, offset + spec.byte_count)
            t = spec.data_type
            if t in ("bool", "bit"):
                slots.append((_K_BIT, offset + spec.bit // 8, None, 1 << (spec.bit % 8)))
            elif t == "string":
                slots.append((_K_STRING, offset, None, spec.length))
            else:
                slots.append((_K_STRUCT, offset, struct.Struct("<" + _STRUCT_CHAR[t]), 0))
        self._slots = slots
        self._min_len = min_len

    def decode(self, data: bytes) -> list[Scalar | DecodeFailure]:
        if len(data) < self._min_len:
            raise CodecError(f"data has {len(data)} bytes, the plan needs {self._min_len}")
        out: list[Scalar | DecodeFailure] = []
        append = out.append
        for kind, pos, fmt, extra in self._slots:
            if kind == _K_STRUCT:
                assert fmt is not None
                append(fmt.unpack_from(data, pos)[0])
            elif kind == _K_BIT:
                append(bool(data[pos] & extra))
            else:
                append(_decode_string(data[pos : pos + extra]))
        return out
