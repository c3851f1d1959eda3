"""SLMP binary frames (3E and 4E) and MELSEC values: pure functions, no I/O.

Frame layout (binary code, all multi-byte fields little-endian):

    request 3E:  50 00 | net | pc | io(2) | drop | len(2) | timer(2) | cmd(2) | sub(2) | data
    request 4E:  54 00 | serial(2) | 00 00 | net | pc | io(2) | drop | len(2) | timer(2) | …
    answer  3E:  D0 00 | net | pc | io(2) | drop | len(2) | end code(2) | data
    answer  4E:  D4 00 | serial(2) | 00 00 | net | pc | io(2) | drop | len(2) | end code(2) | …

`len` counts the bytes after it (timer or end code included). An answer with a non-zero
end code carries, for most end codes, the 9 bytes of the request's route and command.

Commands used: batch read 0401 (sub-command 0000 word units, 0001 bit units), random
read 0403 (0000) and batch write 1401 (0000 word units, 0001 bit units), each device
given as a 3-byte number and a 1-byte device code, the form every series accepts (Q/L
form). Words travel little-endian; a 32-bit value is the
low word first (D100 low, D101 high), as the CPU stores it. Bit units pack two points per
byte, the first point in the high nibble.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from drivers.base import Value

__all__ = [
    "ANSWER_HEADER",
    "CMD_BATCH_READ",
    "CMD_BATCH_WRITE",
    "CMD_RANDOM_READ",
    "END_CODES",
    "CodecError",
    "DecodeFailure",
    "FrameHeader",
    "Route",
    "SlotCodec",
    "batch_read_body",
    "batch_write_body",
    "encode_raw",
    "encode_value",
    "end_code_reason",
    "parse_answer_header",
    "random_read_body",
    "request_frame",
]

CMD_BATCH_READ: Final = 0x0401
CMD_RANDOM_READ: Final = 0x0403
CMD_BATCH_WRITE: Final = 0x1401
SUB_WORD: Final = 0x0000
SUB_BIT: Final = 0x0001

#: Bytes of an answer up to and including the length field.
ANSWER_HEADER: Final[dict[str, int]] = {"3e": 9, "4e": 13}
_SUB_ANSWER: Final[dict[str, bytes]] = {"3e": b"\xd0\x00", "4e": b"\xd4\x00"}
_SUB_REQUEST: Final[dict[str, bytes]] = {"3e": b"\x50\x00", "4e": b"\x54\x00"}

#: End codes and their meaning (SLMP reference manual, list of error codes; the CPU
#: codes 4000-4FFF are the CPU module's own). Unknown codes still say their number.
END_CODES: Final[dict[int, str]] = {
    0x4000: "CPU error: common error information",
    0x4030: "the device cannot be used on this CPU",
    0x4031: "the device number is out of the CPU's range",
    0x4080: "request data error",
    0x40C0: "the CPU rejected the request (remote operation not allowed)",
    0x4A00: "the network number or station is not reachable from this CPU (routing error)",
    0x4A01: "the network number is not in the routing parameters",
    0xC050: "ASCII data that cannot be converted to binary (the port is set to ASCII?)",
    0xC051: "too many bit points for a batch read",
    0xC052: "too many word points for a batch read",
    0xC053: "too many bit points for a random access",
    0xC054: "too many word points for a random read",
    0xC055: "the write runs past the largest address",
    0xC056: "the read runs past the device's largest address",
    0xC058: "the request data length does not match the command",
    0xC059: "command or sub-command not supported by this CPU",
    0xC05B: "the CPU cannot read this device",
    0xC05C: "wrong request: a device this CPU does not have, or a wrong unit",
    0xC05D: "monitor registration has not been made",
    0xC05F: "the request cannot be executed on the target CPU",
    0xC060: "wrong request content (bit device data)",
    0xC061: "the request data length does not match the number of points",
    0xC06F: "binary request to a port set to ASCII (or the reverse)",
    0xC070: "device memory extension cannot be specified for this station",
    0xC0B5: "the CPU cannot handle the data specified",
    0xC200: "remote password error",
    0xC201: "the port is locked by a remote password",
    0xC204: "the request came from another device than the one that unlocked the port",
    0xCEE0: "another function is being requested from the CPU; try again",
    0xCEE1: "the request is larger than the module can take",
    0xCEE2: "the answer is larger than the module can send",
    0xCF10: "the network number or station does not exist (routing)",
    0xCF20: "the communication timed out on the other network",
    0xCF30: "the target station does not support this request",
    0xCF31: "the target station does not support this request (relay)",
    0xCF70: "the network is not reachable (error at the relay station)",
    0xCF71: "the target station did not answer (timeout on the network)",
}

#: End codes that concern the addresses or sizes of one request: splitting it can tell
#: the refused tags from the good ones.
ADDRESS_CODES: Final = frozenset({0x4030, 0x4031, 0xC056, 0xC05B, 0xC05C})


class CodecError(ValueError):
    """Bytes that cannot be the answer asked for."""


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """A value that could not be decoded (a non-ASCII string); the reason is published."""

    reason: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: network, station (PC) number, module I/O, multidrop station."""

    network: int = 0
    station: int = 0xFF
    module_io: int = 0x03FF
    multidrop: int = 0

    def pack(self) -> bytes:
        return struct.pack("<BBHB", self.network, self.station, self.module_io, self.multidrop)


def end_code_reason(code: int) -> str:
    """`end code 0xC056 (the read runs past the device's largest address)`."""
    return f"end code 0x{code:04X} ({END_CODES.get(code, 'unknown end code')})"


def request_frame(
    frame: str, route: Route, timer: int, command: int, sub: int, body: bytes, serial: int = 0
) -> bytes:
    """A complete request frame."""
    tail = struct.pack("<HHH", timer, command, sub) + body
    head = _SUB_REQUEST[frame]
    if frame == "4e":
        head += struct.pack("<HH", serial & 0xFFFF, 0)
    return head + route.pack() + struct.pack("<H", len(tail)) + tail


def batch_read_body(number: int, code: int, points: int) -> bytes:
    """Data of a batch read: head device number (3 bytes), device code, point count."""
    return number.to_bytes(3, "little") + bytes((code,)) + struct.pack("<H", points)


def batch_write_body(number: int, code: int, points: int, data: bytes) -> bytes:
    """Data of a batch write: head device, device code, point count, then the points
    (little-endian words, or bit units packed as `encode_bit_points` does)."""
    return batch_read_body(number, code, points) + data


def random_read_body(words: Sequence[tuple[int, int]], dwords: Sequence[tuple[int, int]]) -> bytes:
    """Data of a random read: counts, then (number, code) of each word and dword point."""
    out = bytearray((len(words), len(dwords)))
    for number, code in (*words, *dwords):
        out += number.to_bytes(3, "little")
        out.append(code)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The fixed part of an answer: serial (4E; 0 on 3E), route, and `length` (bytes that
    follow the header, the end code included)."""

    serial: int
    route: Route
    length: int


def parse_answer_header(frame: str, data: bytes | bytearray) -> FrameHeader:
    """Parse the first ANSWER_HEADER[frame] bytes. Raises CodecError naming the field."""
    if data[0:2] != _SUB_ANSWER[frame]:
        raise CodecError("protocol error: wrong subheader")
    serial = 0
    pos = 2
    if frame == "4e":
        serial, zero = struct.unpack_from("<HH", data, 2)
        if zero != 0:
            raise CodecError("protocol error: wrong subheader")
        pos = 6
    net, pc, io, drop, length = struct.unpack_from("<BBHBH", data, pos)
    return FrameHeader(serial, Route(net, pc, io, drop), length)


# ---------------------------------------------------------------- values

_SCALAR: Final[dict[str, struct.Struct]] = {
    "int16": struct.Struct("<h"),
    "uint16": struct.Struct("<H"),
    "int32": struct.Struct("<i"),
    "uint32": struct.Struct("<I"),
    "int64": struct.Struct("<q"),
    "uint64": struct.Struct("<Q"),
    "float32": struct.Struct("<f"),
    "float64": struct.Struct("<d"),
}

Decoder = Callable[[bytes], "Value | DecodeFailure"]


def _string(data: bytes) -> Value | DecodeFailure:
    text = data.split(b"\x00", 1)[0]
    try:
        return text.decode("ascii").rstrip(" ")
    except UnicodeDecodeError:
        return DecodeFailure(f"string is not ASCII: {text[:16]!r}")


@dataclass(frozen=True, slots=True)
class SlotCodec:
    """How one tag sits in an answer's data.

    `where` is 'word' (a value at byte `offset`), 'wordbit' (bit `bit` of the word at
    `offset`) or 'point' (point number `offset` of a bit-units answer). `size` is the
    number of bytes a 'word' value needs.
    """

    where: str
    data_type: str
    offset: int
    bit: int = 0
    size: int = 2

    def end(self) -> int:
        """Bytes of the answer data this slot needs."""
        if self.where == "point":
            return self.offset // 2 + 1
        return self.offset + self.size

    def decode(self, data: bytes) -> Value | DecodeFailure:
        if self.where == "point":
            byte = data[self.offset >> 1]
            return bool((byte >> 4 if self.offset & 1 == 0 else byte) & 1)
        if self.where == "wordbit":
            return bool((data[self.offset] | data[self.offset + 1] << 8) >> self.bit & 1)
        if self.data_type == "string":
            return _string(data[self.offset : self.offset + self.size])
        value: Value = _SCALAR[self.data_type].unpack_from(data, self.offset)[0]
        return value


def encode_value(data_type: str, value: object, words: int = 1) -> bytes:
    """Raw value → the bytes the CPU stores (little-endian words). For the simulator.
    Raises ValueError/TypeError/OverflowError/struct.error for a value that does not fit."""
    if data_type == "string":
        raw = str(value).encode("ascii", "replace")[: 2 * words]
        return raw.ljust(2 * words, b"\x00")
    if data_type == "bool":
        return struct.pack("<H", 1 if value else 0)
    codec = _SCALAR[data_type]
    if data_type.startswith("float"):
        return codec.pack(float(value))  # type: ignore[arg-type]
    return codec.pack(int(value))  # type: ignore[call-overload]


def decode_bit_points(data: bytes, count: int) -> list[bool]:
    """Bit-units answer data → `count` booleans (first point in the high nibble)."""
    out = []
    for i in range(count):
        byte = data[i >> 1]
        out.append(bool((byte >> 4 if i & 1 == 0 else byte) & 1))
    return out


def encode_bit_points(bits: Sequence[bool]) -> bytes:
    """`count` booleans → bit-units answer data (the simulator's side)."""
    out = bytearray((len(bits) + 1) // 2)
    for i, b in enumerate(bits):
        if b:
            out[i >> 1] |= 0x10 if i & 1 == 0 else 0x01
    return bytes(out)


_RAW_RANGE: Final[dict[str, tuple[int, int]]] = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}


def encode_raw(data_type: str, raw: object, words: int = 1) -> bytes:
    """A raw value written by the driver → the bytes the CPU stores, exactly as
    `SlotCodec.decode` reads them (little-endian words, low word first; strings ASCII,
    low byte first, NUL-padded to `words` words). Strict, unlike `encode_value`: raises
    CodecError for a value of another kind, out of the type's range, not finite, or a
    string that is not ASCII or longer than 2 x `words` characters."""
    if data_type == "string":
        if not isinstance(raw, str):
            raise CodecError(f"type string needs a string, got {raw!r}")
        try:
            data = raw.encode("ascii")
        except UnicodeEncodeError:
            raise CodecError(f"string {raw!r} is not ASCII") from None
        if len(data) > 2 * words:
            raise CodecError(f"string {raw!r} longer than {2 * words} characters")
        return data.ljust(2 * words, b"\x00")
    if data_type == "bool":
        if not isinstance(raw, bool):
            raise CodecError(f"type bool needs true or false, got {raw!r}")
        return struct.pack("<H", 1 if raw else 0)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise CodecError(f"type {data_type} needs a number, got {raw!r}")
    codec = _SCALAR[data_type]
    if data_type.startswith("float"):
        number = float(raw)
        if number != number or number in (float("inf"), float("-inf")):
            raise CodecError(f"{raw!r} is not a finite number")
        try:
            return codec.pack(number)
        except (OverflowError, struct.error):
            raise CodecError(f"{raw!r} does not fit {data_type}") from None
    if not isinstance(raw, int):
        raise CodecError(f"type {data_type} needs an integer, got {raw!r}")
    lo, hi = _RAW_RANGE[data_type]
    if not lo <= raw <= hi:
        raise CodecError(f"{raw!r} does not fit {data_type} ({lo}..{hi})")
    return codec.pack(raw)
