"""Modbus value codec: registers ⇄ Python values, for every type and byte order.

Pure code (only `struct`), shared by the driver (decode) and the simulator (encode), so
simulation and decoding always agree.

Byte order, in the industry's letters, where A is the most significant byte of the value
written big-endian. Registers travel big-endian on the wire, so the orders reduce to two
independent switches:

    order  word order    bytes in a word   32-bit     64-bit      16-bit
    ABCD   as written    as written        AB CD      AB CD EF GH AB
    CDAB   reversed      as written        CD AB      GH EF CD AB AB
    BADC   as written    swapped           BA DC      BA DC FE HG BA
    DCBA   reversed      swapped           DC BA      HG FE DC BA BA

A 16-bit value has no word order, so only the byte swap applies to it. Strings carry two
ASCII characters per register, the first one in the high byte for ABCD/CDAB and in the
low byte for BADC/DCBA; the word order never applies to strings.

Implementation: a block of registers is packed once into big-endian bytes (`be`) and, if
any value needs it, into byte-swapped bytes (`le`). Every value is then a single
`struct.unpack_from` on one of the two buffers:

    ABCD → be, read big-endian        BADC → le, read big-endian
    DCBA → be, read little-endian     CDAB → le, read little-endian
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Final

from drivers.base import Scalar
from drivers.modbus.config import REGISTER_COUNT, ByteOrder, DataType, ModbusTag

__all__ = [
    "BlockDecoder",
    "CodecError",
    "DecodeFailure",
    "ValueSpec",
    "decode",
    "decode_block",
    "encode",
    "type_range",
]

_STRUCT_CHAR: Final[dict[str, str]] = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}

_INT_RANGE: Final[dict[str, tuple[int, int]]] = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}

# Numbers: (use the byte-swapped buffer, read little-endian). Strings: low byte first.
_ORDER: Final[dict[str, tuple[bool, bool]]] = {
    "ABCD": (False, False),
    "BADC": (True, False),
    "CDAB": (True, True),
    "DCBA": (False, True),
}
_STRING_SWAPPED: Final[dict[str, bool]] = {"ABCD": False, "CDAB": False, "BADC": True, "DCBA": True}


class CodecError(ValueError):
    """A value cannot be encoded, or registers cannot be decoded, as the spec says."""


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """Placeholder for a value of a block that could not be decoded (a bad reading)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """How one value sits in registers (or bits): everything the codec needs of a tag."""

    data_type: DataType
    byte_order: ByteOrder = "ABCD"
    bit: int | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.data_type == "bit" and (self.bit is None or not 0 <= self.bit <= 15):
            raise CodecError("type bit needs a bit number 0-15")
        if self.data_type == "string" and (self.length is None or self.length < 1):
            raise CodecError("type string needs a length (registers) >= 1")

    @classmethod
    def from_tag(cls, tag: ModbusTag, device_byte_order: ByteOrder = "ABCD") -> ValueSpec:
        """The spec of `tag`, its own byte order overriding the device's."""
        return cls(
            data_type=tag.type,
            byte_order=tag.byte_order or device_byte_order,
            bit=tag.bit,
            length=tag.length,
        )

    @property
    def register_count(self) -> int:
        """Registers (or bits, for bool) the value occupies."""
        if self.data_type == "string":
            return self.length or 1
        return REGISTER_COUNT[self.data_type]


def type_range(data_type: DataType) -> tuple[int, int] | None:
    """Inclusive raw range of an integer type; None for other types."""
    return _INT_RANGE.get(data_type)


def _regs_to_bytes(registers: Sequence[int], swapped: bool) -> bytes:
    try:
        return struct.pack(f"{'<' if swapped else '>'}{len(registers)}H", *registers)
    except struct.error as exc:
        raise CodecError(f"registers must be integers 0..65535: {exc}") from None


def _bytes_to_regs(data: bytes, swapped: bool) -> list[int]:
    return list(struct.unpack(f"{'<' if swapped else '>'}{len(data) // 2}H", data))


def _decode_string(raw: bytes) -> Scalar | DecodeFailure:
    text = raw.rstrip(b"\x00 ")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        return DecodeFailure(f"string is not ASCII: {text!r}")


# ------------------------------------------------------------------ single values


def decode(spec: ValueSpec, registers: Sequence[int] | Sequence[bool]) -> Scalar:
    """Decode one value from exactly its registers (bits for `bool`).

    Raises CodecError when the registers do not hold a valid value (wrong count,
    non-ASCII string). NaN and infinities are valid floats.
    """
    result = BlockDecoder([(0, spec)]).decode(registers)[0]
    if isinstance(result, DecodeFailure):
        raise CodecError(result.reason)
    return result


def encode(spec: ValueSpec, value: Scalar) -> list[int]:
    """Registers (0/1 for `bool`) holding `value`.

    For `bit` the result is one register with only that bit set or clear: the caller
    merges it into the register it shares with other bits. Strings are padded with NUL.
    Raises CodecError when the value does not fit the type.
    """
    t = spec.data_type
    if t == "bool":
        return [1 if value else 0]
    if t == "bit":
        assert spec.bit is not None  # checked in ValueSpec
        return [(1 << spec.bit) if value else 0]
    if t == "string":
        swapped = _STRING_SWAPPED[spec.byte_order]
        if not isinstance(value, str):
            raise CodecError(f"string value expected, got {value!r}")
        size = 2 * spec.register_count
        try:
            data = value.encode("ascii")
        except UnicodeEncodeError:
            raise CodecError(f"string {value!r} is not ASCII") from None
        if len(data) > size:
            raise CodecError(f"string {value!r} longer than {size} characters")
        return _bytes_to_regs(data.ljust(size, b"\x00"), swapped)
    swapped, little = _ORDER[spec.byte_order]
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
        data = struct.pack(("<" if little else ">") + char, number)
    except (struct.error, OverflowError) as exc:
        raise CodecError(f"{value!r} does not fit {t}: {exc}") from None
    return _bytes_to_regs(data, swapped)


# ------------------------------------------------------------------ block decoding

# Kinds of precompiled slots, kept as small ints for a cheap dispatch in the hot loop.
_K_STRUCT, _K_BIT, _K_BOOL, _K_STRING = 0, 1, 2, 3


@dataclass(slots=True)
class BlockDecoder:
    """Decodes every value of one block read, precompiled once per request.

    `items` are (offset in the block, spec) pairs, in the order the values are wanted;
    offsets are in registers (bits for a coil/discrete-input block). `decode(words)`
    returns one entry per item: the value, or a DecodeFailure with the reason. It never
    raises for bad register contents, only for a block shorter than the plan.
    """

    items: Sequence[tuple[int, ValueSpec]]
    _slots: list[tuple[int, int, bool, struct.Struct | None, int]] = field(init=False, repr=False)
    _needs_be: bool = field(init=False, repr=False)
    _needs_le: bool = field(init=False, repr=False)
    _min_len: int = field(init=False, repr=False)
    # Blocks of numbers only (no strings or bits) with no two values sharing a register:
    # one Struct (with pad bytes) per (buffer, endianness), and the order of the values.
    _groups: list[tuple[bool, struct.Struct]] | None = field(init=False, repr=False)
    _reorder: Callable[[tuple[Scalar, ...]], tuple[Scalar, ...]] | None = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        slots: list[tuple[int, int, bool, struct.Struct | None, int]] = []
        needs_be = needs_le = False
        min_len = 0
        for offset, spec in self.items:
            min_len = max(min_len, offset + spec.register_count)
            t = spec.data_type
            if t == "bool":
                slots.append((_K_BOOL, offset, False, None, 0))
                continue
            if t == "bit":
                slots.append((_K_BIT, offset, False, None, spec.bit or 0))
                continue
            if t == "string":
                swapped = _STRING_SWAPPED[spec.byte_order]
            else:
                swapped, little = _ORDER[spec.byte_order]
            needs_le |= swapped
            needs_be |= not swapped
            if t == "string":
                slots.append((_K_STRING, 2 * offset, swapped, None, 2 * spec.register_count))
                continue
            fmt = struct.Struct(("<" if little else ">") + _STRUCT_CHAR[t])
            slots.append((_K_STRUCT, 2 * offset, swapped, fmt, 0))
        self._slots = slots
        self._needs_be = needs_be
        self._needs_le = needs_le
        self._min_len = min_len
        self._groups, self._reorder = _compile_groups(self.items, slots)

    @property
    def numbers_only(self) -> bool:
        """True when `decode_bytes` never returns a DecodeFailure (numbers only)."""
        return self._groups is not None

    def decode(self, words: Sequence[int] | Sequence[bool]) -> list[Scalar | DecodeFailure]:
        """Decode the block `words` (registers, or bits for bool values)."""
        if len(words) < self._min_len:
            raise CodecError(f"block has {len(words)} words, the plan needs {self._min_len}")
        regs: Sequence[int] = words
        be = _regs_to_bytes(regs, False) if self._needs_be else b""
        le = _regs_to_bytes(regs, True) if self._needs_le else b""
        return self._decode(words, be, le)

    def decode_bytes(self, be: bytes) -> Sequence[Scalar | DecodeFailure]:
        """Decode a register block given as its bytes as they travel (big-endian
        registers, e.g. a read answer's data): the same values as `decode` of those
        registers, without a list of ints in between."""
        if len(be) < 2 * self._min_len or len(be) % 2:
            raise CodecError(f"block has {len(be) / 2:g} registers, the plan needs {self._min_len}")
        le = b""
        if self._needs_le:
            swapped = array("H", be)
            swapped.byteswap()
            le = swapped.tobytes()
        groups, reorder = self._groups, self._reorder
        if groups is not None and reorder is not None:
            values: tuple[Scalar, ...] = ()
            for use_le, fmt in groups:
                values += fmt.unpack_from(le if use_le else be)
            return reorder(values)
        words: Sequence[int] = ()
        if any(kind == _K_BIT for kind, *_ in self._slots):
            words = struct.unpack(f">{len(be) // 2}H", be)
        return self._decode(words, be, le)

    def _decode(
        self, words: Sequence[int] | Sequence[bool], be: bytes, le: bytes
    ) -> list[Scalar | DecodeFailure]:
        out: list[Scalar | DecodeFailure] = []
        append = out.append
        for kind, pos, swapped, fmt, extra in self._slots:
            if kind == _K_STRUCT:
                assert fmt is not None
                append(fmt.unpack_from(le if swapped else be, pos)[0])
            elif kind == _K_BIT:
                append(bool((words[pos] >> extra) & 1))
            elif kind == _K_BOOL:
                append(bool(words[pos]))
            else:
                append(_decode_string((le if swapped else be)[pos : pos + extra]))
        return out


def _compile_groups(
    items: Sequence[tuple[int, ValueSpec]],
    slots: Sequence[tuple[int, int, bool, struct.Struct | None, int]],
) -> tuple[
    list[tuple[bool, struct.Struct]] | None,
    Callable[[tuple[Scalar, ...]], tuple[Scalar, ...]] | None,
]:
    """The fast form of a block of numbers: per (buffer, endianness) one Struct reading
    its values in address order with pad bytes between them, and a getter that puts the
    concatenated results back into item order. (None, None) when the block has strings,
    bits or bools, or values that share a register (then every value is unpacked alone)."""
    if not slots or any(kind != _K_STRUCT for kind, *_ in slots):
        return None, None
    spans = sorted((2 * offset, 2 * offset + 2 * spec.register_count) for offset, spec in items)
    if any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)):
        return None, None
    keyed: dict[tuple[bool, str], list[tuple[int, int, str]]] = {}
    for number, (_k, pos, swapped, fmt, _x) in enumerate(slots):
        assert fmt is not None
        keyed.setdefault((swapped, fmt.format[0]), []).append((pos, number, fmt.format[1:]))
    groups: list[tuple[bool, struct.Struct]] = []
    order: list[int] = []
    for (swapped, endian), members in keyed.items():
        members.sort()
        text, at = endian, 0
        for pos, number, char in members:
            if pos > at:
                text += f"{pos - at}x"
            text += char
            at = pos + struct.calcsize(endian + char)
            order.append(number)
        groups.append((swapped, struct.Struct(text)))
    # order[j] = the item the j-th unpacked value belongs to; invert it.
    where = [0] * len(order)
    for j, number in enumerate(order):
        where[number] = j
    if len(where) == 1:
        only = where[0]
        return groups, lambda values: (values[only],)
    return groups, itemgetter(*where)


def decode_block(
    items: Sequence[tuple[int, ValueSpec]], words: Sequence[int] | Sequence[bool]
) -> list[Scalar | DecodeFailure]:
    """One-off convenience for `BlockDecoder(items).decode(words)`.

    On a hot path build the BlockDecoder once (the planner does) and reuse it.
    """
    return BlockDecoder(items).decode(words)
