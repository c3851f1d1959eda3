"""Modbus writes, as pure code: a tag and its raw value → the write request(s) to send.

One write is one tag. The raw value is encoded with the same codec, the same `ValueSpec`
and so the same byte and word order as `read` decodes it (drivers/modbus/codec.py):

    coil (type bool)                   function 5 (write single coil), or 15 with
                                       `write_functions: multiple`
    holding, one register              function 6 (write single register), or 16 with
    (int16, uint16)                    `write_functions: multiple`
    holding, several registers         function 16 (write multiple registers), in one
    (32/64-bit, float, string)         request: the value is never written half
    holding, type bit                  function 22 (mask write register), or with
                                       `bit_write: read_modify_write` function 3 then 6/16
    discrete input, input register     refused: read-only in the Modbus data model

`WriteOp.pdu()` is the request PDU; `answer_size(fc)` the size of the device's echo, so
a framer can tell a complete answer. A device confirms a write by echoing the address
and the value (5, 6), the address and the quantity (15, 16) or the whole request (22);
`echo_matches` checks that echo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from drivers.base import Scalar
from drivers.modbus.codec import CodecError, ValueSpec, encode
from drivers.modbus.config import ByteOrder, ModbusTag

__all__ = [
    "WRITE_FUNCTIONS",
    "WriteOp",
    "answer_size",
    "check_raw",
    "echo_size",
    "merge_bit",
    "plan_write",
]

WRITE_FUNCTIONS: Final = frozenset({5, 6, 15, 16, 22})

_NAMES: Final[dict[int, str]] = {
    5: "write single coil",
    6: "write single register",
    15: "write multiple coils",
    16: "write multiple registers",
    22: "mask write register",
}


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One write request: function `function_code` at `address`. `words` are the bits
    (5, 15), the registers (6, 16), or (and mask, or mask) for 22."""

    function_code: int
    address: int
    words: tuple[int, ...]

    def pdu(self) -> bytes:
        """The request PDU (function code first)."""
        fc, address, words = self.function_code, self.address, self.words
        head = bytes((fc,)) + address.to_bytes(2, "big")
        if fc == 5:
            return head + (b"\xff\x00" if words[0] else b"\x00\x00")
        if fc == 6:
            return head + words[0].to_bytes(2, "big")
        if fc == 22:
            return head + words[0].to_bytes(2, "big") + words[1].to_bytes(2, "big")
        if fc == 15:
            packed = bytearray((len(words) + 7) // 8)
            for i, bit in enumerate(words):
                if bit:
                    packed[i // 8] |= 1 << (i % 8)
            return head + len(words).to_bytes(2, "big") + bytes((len(packed),)) + bytes(packed)
        if fc == 16:
            data = b"".join(w.to_bytes(2, "big") for w in words)
            return head + len(words).to_bytes(2, "big") + bytes((len(data),)) + data
        raise ValueError(f"function code {fc} is not a write")

    def describe(self) -> str:
        """`function 16 (write multiple registers) at holding 10, 2 registers`."""
        fc = self.function_code
        table = "coil" if fc in (5, 15) else "holding"
        size = len(self.words) if fc in (15, 16) else 1
        unit = ("coils" if size > 1 else "coil") if table == "coil" else "register"
        if table == "holding" and size > 1:
            unit = "registers"
        return f"function {fc} ({_NAMES[fc]}) at {table} {self.address}, {size} {unit}"


def echo_size(function_code: int) -> int:
    """Bytes after the function code that a device's answer to a write echoes from the
    request: address + value / quantity (4), or address + both masks for 22 (6)."""
    return 6 if function_code == 22 else 4


def answer_size(function_code: int) -> int:
    """Size of the answer PDU (function code included) to a write."""
    return 1 + echo_size(function_code)


def check_raw(tag: ModbusTag, raw: Scalar) -> None:
    """Raise CodecError unless `raw` is a value of the tag's type (bool for bool/bit,
    int for integer types, a finite int or float for floats, str for strings)."""
    t = tag.type
    if t in ("bool", "bit"):
        if not isinstance(raw, bool):
            raise CodecError(f"type {t} needs true or false, got {raw!r}")
        return
    if t == "string":
        if not isinstance(raw, str):
            raise CodecError(f"type string needs a string, got {raw!r}")
        return
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise CodecError(f"type {t} needs a number, got {raw!r}")
    if t in ("float32", "float64"):
        if not math.isfinite(raw):
            raise CodecError(f"{raw!r} is not a finite number")
        return
    if not isinstance(raw, int):
        raise CodecError(f"type {t} needs an integer, got {raw!r}")


def plan_write(
    tag: ModbusTag,
    raw: Scalar,
    *,
    device_byte_order: ByteOrder = "ABCD",
    write_functions: str = "single",
    bit_write: str = "mask",
) -> WriteOp | None:
    """The request writing `raw` to `tag` (a coil or holding tag). Returns None for a
    `bit` tag with `bit_write: read_modify_write`: the caller reads the register and
    calls `merge_bit`. Raises CodecError when `raw` does not fit the tag's type."""
    check_raw(tag, raw)
    spec = ValueSpec.from_tag(tag, device_byte_order)
    words = encode(spec, raw)
    address = tag.resolved_address()
    multiple = write_functions == "multiple"
    if tag.type == "bool":
        return WriteOp(15 if multiple else 5, address, (words[0],))
    if tag.type == "bit":
        if bit_write != "mask":
            return None
        bit = 1 << (tag.bit or 0)
        return WriteOp(22, address, (0xFFFF & ~bit, words[0]))
    if len(words) == 1 and not multiple:
        return WriteOp(6, address, (words[0],))
    return WriteOp(16, address, tuple(words))


def merge_bit(tag: ModbusTag, raw: Scalar, current: int, write_functions: str) -> WriteOp:
    """Read-modify-write of a `bit` tag: the register `current` with the tag's bit set to
    `raw`, as one write (6, or 16 with `write_functions: multiple`)."""
    check_raw(tag, raw)
    bit = 1 << (tag.bit or 0)
    value = (current | bit) if raw else (current & ~bit & 0xFFFF)
    fc = 16 if write_functions == "multiple" else 6
    return WriteOp(fc, tag.resolved_address(), (value,))
