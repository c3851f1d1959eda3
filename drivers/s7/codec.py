"""S7 frames and values: pure code (only `struct`), shared by the driver and the simulator.

The layers on the wire (ISO-on-TCP, RFC 1006, port 102):

    TPKT  03 00 <length:2>                      (length counts the whole frame)
    COTP  CR/CC: <li> E0|D0 <dst:2> <src:2> <class> <params: C0 size, C1 local, C2 remote TSAP>
          DT:    02 F0 <80 | 00>                (top bit: last fragment of the S7 PDU)
    S7    32 <type> 00 00 <pdu ref:2> <param length:2> <data length:2> [<class> <code>]
          type 1 (job) has a 10-byte header; types 2 (ack) and 3 (ack-data) add the error
          class and code (12 bytes).

Setup communication (function F0) negotiates the PDU size; read variable (function 04)
carries up to N items of 12 bytes each (`12 0A 10 <transport size> <count:2> <db:2>
<area> <bit address:3>`) and is answered by one data item per request item:
`<return code> <transport size> <length:2> <data>`, plus a fill byte after an odd-length
item that is not the last one (a zero fill byte after an odd last item, counted in the
header's data length, is tolerated). Write variable (function 05) carries the same item
specification (transport size BIT with the bit in the address, or BYTE x count) and one
data item per item (`00 <03 bit | 04 bytes> <length in bits:2> <data>`), and is answered
by one return code per item. Every answer is checked against the request it answers
(`parse_read_response`): a frame that does not fit raises FrameError and no value of it
is decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from drivers.base import Scalar

__all__ = [
    "HEADER_ERRORS",
    "ITEM_CODES",
    "CodecError",
    "FrameError",
    "HeaderError",
    "ItemResult",
    "ReadItem",
    "ValueSpec",
    "cotp_confirm",
    "cotp_connect_request",
    "cotp_data",
    "decode",
    "encode",
    "header_error_reason",
    "item_reason",
    "parse_cotp_connect",
    "parse_read_response",
    "parse_setup_response",
    "parse_write_response",
    "read_request",
    "read_response_size",
    "setup_request",
    "tpkt",
    "write_request",
]

TPKT_HEADER: Final = 4
COTP_DT_HEADER: Final = 3
JOB_HEADER: Final = 10
ACK_HEADER: Final = 12
ITEM_SPEC: Final = 12  # one item of a read-variable request
ITEM_HEADER: Final = 4  # one data item of its answer, before the data
READ_PARAMS: Final = 2  # function 04 + item count

FUNC_READ: Final = 0x04
FUNC_WRITE: Final = 0x05
FUNC_SETUP: Final = 0xF0

TS_BIT: Final = 0x01
TS_BYTE: Final = 0x02
#: Transport sizes of a data item (of a write request, or a read answer).
DATA_TS_BIT: Final = 0x03  # length counts bits
DATA_TS_BYTE: Final = 0x04  # BYTE/WORD/DWORD: length counts bits

#: Item return codes (the first byte of every data item of an answer).
ITEM_CODES: Final[dict[int, str]] = {
    0x00: "reserved",
    0x01: "hardware fault",
    0x03: "accessing the object not allowed",
    0x05: "address out of range",
    0x06: "data type not supported",
    0x07: "data type inconsistent",
    0x0A: "object does not exist",
    0xFF: "success",
}

#: Header errors (class << 8 | code) of an ack, with what to do about them.
HEADER_ERRORS: Final[dict[int, str]] = {
    0x8104: "function refused by the CPU: on an S7-1200/1500 enable 'Permit access with "
    "PUT/GET communication from remote partner' (CPU properties > Protection & Security > "
    "Connection mechanisms) and download the hardware configuration; turn 'Optimized block "
    "access' off in the properties of every DB read",
    0x8500: "request or answer larger than the negotiated PDU",
    0x8304: "write access refused by the CPU (protection level)",
    0xD602: "protection: the CPU's access level needs a password",
}


class CodecError(ValueError):
    """A value cannot be encoded or decoded as its spec says."""


class FrameError(Exception):
    """Bytes that are not the answer they should be (`reason` is for people)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HeaderError(Exception):
    """The PLC answered a job with an error in the S7 header (the whole job failed)."""

    def __init__(self, code: int) -> None:
        super().__init__(header_error_reason(code))
        self.code = code


def header_error_reason(code: int) -> str:
    """`s7 error 0x8104 (function refused by the CPU: …)`."""
    known = HEADER_ERRORS.get(code, "unknown error")
    return f"s7 error 0x{code:04X} ({known})"


def item_reason(code: int) -> str:
    """`s7 item 0x05 (address out of range)`: the reason of a bad reading."""
    return f"s7 item 0x{code:02X} ({ITEM_CODES.get(code, 'unknown return code')})"


# ---------------------------------------------------------------- TPKT / COTP


def tpkt(payload: bytes) -> bytes:
    """A TPKT frame around `payload` (a COTP TPDU)."""
    return b"\x03\x00" + struct.pack(">H", len(payload) + TPKT_HEADER) + payload


def cotp_data(s7pdu: bytes) -> bytes:
    """A whole frame carrying one S7 PDU in a single COTP DT TPDU (last fragment)."""
    return tpkt(b"\x02\xf0\x80" + s7pdu)


def cotp_connect_request(local_tsap: int, remote_tsap: int, *, src_ref: int = 1) -> bytes:
    """The COTP connection request (CR) frame, TPDU size 1024."""
    params = (
        b"\xc0\x01\x0a"
        + b"\xc1\x02"
        + struct.pack(">H", local_tsap)
        + b"\xc2\x02"
        + struct.pack(">H", remote_tsap)
    )
    body = b"\xe0\x00\x00" + struct.pack(">H", src_ref) + b"\x00" + params
    return tpkt(bytes([len(body)]) + body)


def _cotp_params(tpdu: bytes) -> dict[int, bytes]:
    li = tpdu[0]
    if li + 1 > len(tpdu) or li < 6:
        raise FrameError("protocol error: bad COTP length")
    params: dict[int, bytes] = {}
    pos = 7
    while pos < li + 1:
        if pos + 2 > li + 1:
            raise FrameError("protocol error: bad COTP parameter")
        code, size = tpdu[pos], tpdu[pos + 1]
        if pos + 2 + size > li + 1:
            raise FrameError("protocol error: bad COTP parameter")
        params[code] = tpdu[pos + 2 : pos + 2 + size]
        pos += 2 + size
    return params


def parse_cotp_connect(tpdu: bytes) -> tuple[int, int]:
    """(calling TSAP, called TSAP) of a connection request TPDU (simulator side)."""
    if len(tpdu) < 7 or tpdu[1] & 0xF0 != 0xE0:
        raise FrameError("protocol error: not a COTP connection request")
    params = _cotp_params(tpdu)
    local, remote = params.get(0xC1, b""), params.get(0xC2, b"")
    if len(local) != 2 or len(remote) != 2:
        raise FrameError("protocol error: connection request without TSAPs")
    return int.from_bytes(local, "big"), int.from_bytes(remote, "big")


def cotp_confirm(tpdu: bytes) -> None:
    """Check a connection confirm TPDU; raises FrameError (a disconnect or error TPDU
    means the PLC refused the TSAPs)."""
    if len(tpdu) < 2:
        raise FrameError("protocol error: short COTP frame")
    kind = tpdu[1] & 0xF0
    if kind in (0x80, 0x70):  # DR, ER
        raise FrameError("refused: the PLC refused the ISO connection (check rack/slot or TSAPs)")
    if kind != 0xD0:
        raise FrameError("protocol error: not a COTP connection confirm")
    _cotp_params(tpdu)


def cotp_connect_confirm(request_tpdu: bytes) -> bytes:
    """The connection confirm (CC) frame answering `request_tpdu` (simulator side)."""
    src_ref = request_tpdu[4:6] if len(request_tpdu) >= 6 else b"\x00\x01"
    params = request_tpdu[7 : request_tpdu[0] + 1]
    body = b"\xd0" + src_ref + b"\x00\x01\x00" + params
    return tpkt(bytes([len(body)]) + body)


def cotp_disconnect(request_tpdu: bytes) -> bytes:
    """A disconnect request (DR) frame refusing `request_tpdu` (simulator side)."""
    src_ref = request_tpdu[4:6] if len(request_tpdu) >= 6 else b"\x00\x01"
    body = b"\x80" + src_ref + b"\x00\x00\x00"
    return tpkt(bytes([len(body)]) + body)


# ---------------------------------------------------------------- S7 PDUs


def _job(ref: int, params: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">BBHHHH", 0x32, 1, 0, ref, len(params), len(data)) + params + data


def ack_data(ref: int, params: bytes, data: bytes = b"", error: int = 0) -> bytes:
    """An ack-data PDU (type 3) (simulator side)."""
    head = struct.pack(">BBHHHHH", 0x32, 3, 0, ref, len(params), len(data), error)
    return head + params + data


def ack_error(ref: int, error: int) -> bytes:
    """An ack PDU (type 2) with a header error and nothing else, as an S7-1200/1500
    answers a read while PUT/GET is not permitted (simulator side)."""
    return struct.pack(">BBHHHHH", 0x32, 2, 0, ref, 0, 0, error)


def setup_request(ref: int, pdu_size: int) -> bytes:
    """The setup-communication job asking for `pdu_size`."""
    return _job(ref, struct.pack(">BBHHH", FUNC_SETUP, 0, 1, 1, pdu_size))


def _ack_header(pdu: bytes, ref: int) -> tuple[int, int, int]:
    """Checks an ack header; returns (param length, data length, header end)."""
    if len(pdu) < 2 or pdu[0] != 0x32:
        raise FrameError("protocol error: not an S7 PDU")
    if pdu[1] not in (2, 3):
        raise FrameError(f"protocol error: PDU type {pdu[1]} where an ack was expected")
    if len(pdu) < ACK_HEADER:
        raise FrameError("protocol error: short S7 header")
    _, _, _, got_ref, plen, dlen, error = struct.unpack_from(">BBHHHHH", pdu)
    if got_ref != ref:
        raise FrameError("protocol error: wrong PDU reference")
    if ACK_HEADER + plen + dlen != len(pdu):
        raise FrameError("protocol error: wrong S7 length")
    if error:
        raise HeaderError(error)
    if pdu[1] != 3:
        raise FrameError("protocol error: ack without data")
    return plen, dlen, ACK_HEADER


def parse_setup_response(pdu: bytes, ref: int) -> int:
    """The PDU size the PLC granted."""
    plen, _, pos = _ack_header(pdu, ref)
    if plen != 8 or pdu[pos] != FUNC_SETUP:
        raise FrameError("protocol error: not a setup-communication answer")
    granted = int.from_bytes(pdu[pos + 6 : pos + 8], "big")
    if granted < 64:  # nothing useful fits; a PLC never grants this
        raise FrameError(f"protocol error: PDU size {granted} granted")
    return granted


@dataclass(frozen=True, slots=True)
class ReadItem:
    """One variable of a read: `count` bytes of `area` (wire code) from byte `start`."""

    area_code: int
    db: int
    start: int
    count: int


def read_request(ref: int, items: Sequence[ReadItem]) -> bytes:
    """The read-variable job for `items` (each read as BYTE x count)."""
    params = bytearray((FUNC_READ, len(items)))
    for it in items:
        params += (
            b"\x12\x0a\x10"
            + struct.pack(">BHHB", TS_BYTE, it.count, it.db, it.area_code)
            + (it.start << 3).to_bytes(3, "big")
        )
    return _job(ref, bytes(params))


def write_request(ref: int, item: ReadItem, data: bytes, bit: int | None = None) -> bytes:
    """The write-variable job of one item: `data` (count bytes) from byte `item.start`, or
    with `bit` one bit (data: one byte, 0 or 1) at `item.start`.`bit`."""
    if bit is not None:
        if not 0 <= bit <= 7 or len(data) != 1 or data[0] not in (0, 1):
            raise CodecError("a bit write carries one byte, 0 or 1, for bit 0-7")
        ts, count, address, data_ts, length = TS_BIT, 1, item.start << 3 | bit, DATA_TS_BIT, 1
    else:
        if len(data) != item.count or not data:
            raise CodecError(f"{len(data)} bytes for an item of {item.count}")
        ts, count, address = TS_BYTE, item.count, item.start << 3
        data_ts, length = DATA_TS_BYTE, 8 * len(data)
    params = (
        bytes((FUNC_WRITE, 1))
        + b"\x12\x0a\x10"
        + struct.pack(">BHHB", ts, count, item.db, item.area_code)
        + address.to_bytes(3, "big")
    )
    return _job(ref, params, struct.pack(">BBH", 0, data_ts, length) + data)


def write_request_size(data_bytes: int) -> int:
    """Bytes of a one-item write job carrying `data_bytes` bytes."""
    return JOB_HEADER + 2 + ITEM_SPEC + ITEM_HEADER + data_bytes


def parse_write_response(pdu: bytes, ref: int, items: int = 1) -> list[int]:
    """The return code of each item of the answer to a write job of `items` items.
    Raises HeaderError when the PLC refused the whole job, FrameError for bytes that are
    not that answer."""
    plen, dlen, pos = _ack_header(pdu, ref)
    if plen != 2 or pdu[pos] != FUNC_WRITE:
        raise FrameError("protocol error: not a write-variable answer")
    if pdu[pos + 1] != items:
        raise FrameError("protocol error: wrong item count")
    if dlen != items:
        raise FrameError("protocol error: wrong write answer length")
    return list(pdu[pos + 2 : pos + 2 + items])


def read_response_size(sizes: Sequence[int]) -> int:
    """Bytes of the S7 answer to a read of items of `sizes` bytes (fill bytes included)."""
    total = ACK_HEADER + READ_PARAMS
    for i, n in enumerate(sizes):
        total += ITEM_HEADER + n + (n & 1 if i < len(sizes) - 1 else 0)
    return total


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The answer to one item: `code` 0xFF and its bytes, or an error code and b''."""

    code: int
    data: bytes


_BIT_LENGTH_TS = frozenset({0x03, 0x04, 0x05})  # length in bits
_BYTE_LENGTH_TS = frozenset({0x06, 0x07, 0x08, 0x09})  # length in bytes


def parse_read_response(pdu: bytes, ref: int, items: Sequence[ReadItem]) -> list[ItemResult]:
    """Check and split the answer to `read_request(ref, items)`.

    Raises HeaderError when the PLC refused the whole job, FrameError when the bytes
    are not a consistent answer to this request (wrong reference, function, item count,
    lengths, transport size, trailing bytes).
    """
    plen, dlen, pos = _ack_header(pdu, ref)
    if plen != READ_PARAMS or pdu[pos] != FUNC_READ:
        raise FrameError("protocol error: not a read-variable answer")
    if pdu[pos + 1] != len(items):
        raise FrameError("protocol error: wrong item count")
    pos += READ_PARAMS
    end = len(pdu)
    out: list[ItemResult] = []
    last = len(items) - 1
    for i, item in enumerate(items):
        if pos + ITEM_HEADER > end:
            raise FrameError("protocol error: answer stops short")
        code, ts, length = pdu[pos], pdu[pos + 1], int.from_bytes(pdu[pos + 2 : pos + 4], "big")
        pos += ITEM_HEADER
        if code != 0xFF:
            if length:
                raise FrameError("protocol error: data in a refused item")
            out.append(ItemResult(code, b""))
            continue
        if ts in _BIT_LENGTH_TS:
            if length % 8:
                raise FrameError("protocol error: wrong item length")
            size = length // 8
        elif ts in _BYTE_LENGTH_TS:
            size = length
        else:
            raise FrameError(f"protocol error: transport size 0x{ts:02X}")
        if size != item.count:
            raise FrameError("protocol error: wrong item length")
        if pos + size > end:
            raise FrameError("protocol error: answer stops short")
        out.append(ItemResult(code, pdu[pos : pos + size]))
        pos += size
        if size & 1 and i < last:
            pos += 1  # fill byte
    if pos == end - 1 and out and len(out[-1].data) & 1 and pdu[pos] == 0:
        pos += 1  # a fill byte after an odd last item: counted in the header, harmless
    if pos != end:
        raise FrameError("protocol error: unexpected data")
    del dlen
    return out


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """How one tag's bytes are decoded: type, bit (bool) and declared length (string)."""

    data_type: str
    bit: int = 0
    length: int = 0

    @property
    def size(self) -> int:
        if self.data_type == "string":
            return 2 + self.length
        return _SIZE[self.data_type]


_SIZE: Final[dict[str, int]] = {
    "bool": 1,
    "byte": 1,
    "int": 2,
    "word": 2,
    "dint": 4,
    "dword": 4,
    "real": 4,
    "lreal": 8,
    "date_and_time": 8,
}
_STRUCTS: Final[dict[str, struct.Struct]] = {
    "byte": struct.Struct(">B"),
    "int": struct.Struct(">h"),
    "word": struct.Struct(">H"),
    "dint": struct.Struct(">i"),
    "dword": struct.Struct(">I"),
    "real": struct.Struct(">f"),
    "lreal": struct.Struct(">d"),
}
INT_RANGE: Final[dict[str, tuple[int, int]]] = {
    "byte": (0, 0xFF),
    "int": (-(1 << 15), (1 << 15) - 1),
    "word": (0, 0xFFFF),
    "dint": (-(1 << 31), (1 << 31) - 1),
    "dword": (0, 0xFFFFFFFF),
}


def _from_bcd(b: int) -> int:
    hi, lo = b >> 4, b & 0x0F
    if hi > 9 or lo > 9:
        raise CodecError(f"byte 0x{b:02X} is not BCD")
    return hi * 10 + lo


def _to_bcd(n: int) -> int:
    return (n // 10) << 4 | n % 10


def _decode_dt(raw: bytes) -> str:
    yy, mo, dd, hh, mi, ss = (_from_bcd(b) for b in raw[:6])
    ms_hi = _from_bcd(raw[6])
    ms_lo, weekday = raw[7] >> 4, raw[7] & 0x0F
    if ms_lo > 9 or not 1 <= weekday <= 7:
        raise CodecError("invalid DATE_AND_TIME (milliseconds or weekday)")
    year = 1900 + yy if yy >= 90 else 2000 + yy
    try:
        value = datetime(year, mo, dd, hh, mi, ss, (ms_hi * 10 + ms_lo) * 1000)
    except ValueError as exc:
        raise CodecError(f"invalid DATE_AND_TIME: {exc}") from None
    return value.isoformat(timespec="milliseconds")


def _encode_dt(value: Scalar) -> bytes:
    if not isinstance(value, str):
        raise CodecError("DATE_AND_TIME takes an ISO date-time string")
    dt = datetime.fromisoformat(value)
    if not 1990 <= dt.year <= 2089:
        raise CodecError("DATE_AND_TIME holds the years 1990-2089")
    ms = dt.microsecond // 1000
    weekday = dt.isoweekday() % 7 + 1  # 1 = Sunday
    head = bytes(
        _to_bcd(n) for n in (dt.year % 100, dt.month, dt.day, dt.hour, dt.minute, dt.second)
    )
    return head + bytes((_to_bcd(ms // 10), (ms % 10) << 4 | weekday))


def decode(spec: ValueSpec, buf: bytes, offset: int) -> Scalar:
    """The value of `spec` at `offset` of `buf`; raises CodecError for bytes that are not
    a valid value (a STRING whose current length exceeds its maximum, a DATE_AND_TIME
    that is not BCD) or a buffer that is too short."""
    t = spec.data_type
    if offset + spec.size > len(buf):
        raise CodecError(f"{t} needs {spec.size} bytes at {offset}, have {len(buf) - offset}")
    if t == "bool":
        return bool(buf[offset] >> spec.bit & 1)
    st = _STRUCTS.get(t)
    if st is not None:
        value: Scalar = st.unpack_from(buf, offset)[0]
        return value
    if t == "string":
        max_len, cur = buf[offset], buf[offset + 1]
        if cur > max_len or cur > spec.length:
            raise CodecError(
                f"STRING header says {cur} characters of at most {max_len} (declared {spec.length})"
            )
        return bytes(buf[offset + 2 : offset + 2 + cur]).decode("latin-1")
    if t == "date_and_time":
        return _decode_dt(bytes(buf[offset : offset + 8]))
    raise CodecError(f"unknown type {t}")


def encode(spec: ValueSpec, value: Scalar) -> bytes:
    """The bytes of `value` as `spec` (bool: one byte with only `bit` set or clear —
    the caller merges it into the byte it shares with other bits)."""
    t = spec.data_type
    if t == "bool":
        return bytes((1 << spec.bit if value else 0,))
    st = _STRUCTS.get(t)
    if st is not None:
        if t in INT_RANGE:
            if isinstance(value, str) or not float(value).is_integer():
                raise CodecError(f"{t} takes an integer, not {value!r}")
            lo, hi = INT_RANGE[t]
            if not lo <= int(value) <= hi:
                raise CodecError(f"{value} is out of range for {t}")
            return st.pack(int(value))
        if isinstance(value, str):
            raise CodecError(f"{t} takes a number, not {value!r}")
        try:
            return st.pack(float(value))
        except (OverflowError, struct.error) as exc:
            raise CodecError(f"{value} does not fit {t}: {exc}") from None
    if t == "string":
        raw = str(value).encode("latin-1", "replace")[: spec.length]
        return bytes((spec.length, len(raw))) + raw + bytes(spec.length - len(raw))
    if t == "date_and_time":
        return _encode_dt(value)
    raise CodecError(f"unknown type {t}")
