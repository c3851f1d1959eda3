"""Engineering value → the tag's raw value: the inverse of what the normaliser publishes.

The normaliser publishes ``raw * scale + offset`` (agent.normalize.scale_value); a write
sends ``(value - offset) / scale``, then

- integer types: rounded to the nearest integer (half to even) and checked against the
  width of the type (int16: -32,768 .. 32,767, uint16: 0 .. 65,535, ...);
- float32: rounded to the nearest float32 and checked against float32's range, so the
  raw value is exactly what the device will hold (a read-back compares exactly);
- float64: checked to be finite;
- bool: true/false (or 0/1); scale and offset do not apply to bits, as on reads;
- string: text, unchanged (a string longer than the tag holds is the driver's to refuse).

The type is the tag's `type` (the protocols' names: int16, dint, UInt16, real, ...), or
its `write_type` where a protocol's names need translating (the fake protocol's `int`).
A tag whose model says `write_type = None` (a protocol whose `type` is only a simulator
hint, where the device's own type decides) takes the value as given: numbers scaled
back, a whole result sent as an integer. Pure functions.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

from drivers.base import Scalar, TagCommon

Kind = Literal["bool", "int", "float", "str", "any"]

FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]


@dataclass(frozen=True, slots=True)
class RawType:
    """What a tag's raw value is: its kind, and for numbers its width in bits."""

    name: str
    kind: Kind
    bits: int = 0
    signed: bool = True

    def int_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def describe(self) -> str:
        if self.kind == "int":
            lo, hi = self.int_range()
            return f"{self.name} holds {lo:,} .. {hi:,}"
        if self.kind == "float" and self.bits == 32:
            return f"{self.name} holds ±{FLOAT32_MAX:.7g}"
        return self.name


def _ints() -> dict[str, RawType]:
    out: dict[str, RawType] = {}
    for names, bits, signed in (
        (("int8", "SByte"), 8, True),
        (("uint8", "Byte", "byte"), 8, False),
        (("int16", "Int16", "int"), 16, True),  # S7 INT is 16 bits
        (("uint16", "UInt16", "word"), 16, False),
        (("int32", "Int32", "dint"), 32, True),
        (("uint32", "UInt32", "dword"), 32, False),
        (("int64", "Int64"), 64, True),
        (("uint64", "UInt64"), 64, False),
    ):
        for n in names:
            out[n] = RawType(n, "int", bits, signed)
    return out


TYPES: dict[str, RawType] = {
    **{n: RawType(n, "bool") for n in ("bool", "bit", "Boolean")},
    **_ints(),
    **{n: RawType(n, "float", 32) for n in ("float32", "Float", "real")},
    **{n: RawType(n, "float", 64) for n in ("float64", "Double", "lreal")},
    **{n: RawType(n, "str") for n in ("string", "String")},
}

ANY = RawType("(the server's type)", "any")


class ConversionError(ValueError):
    """The value cannot become the tag's raw value. `code` is a stable id
    (docs/commands.md, "Refusal reasons"); the message says why, for people."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def type_name(tag: TagCommon) -> str | None:
    """The tag's type as the conversion knows it (see the module docstring)."""
    # A tag model with `write_type` says what its writes are (None: whatever the device's
    # type is, e.g. a protocol whose `type` is only a simulator hint).
    name = tag.write_type if hasattr(tag, "write_type") else getattr(tag, "type", None)
    return name if isinstance(name, str) else None


def raw_type(tag: TagCommon) -> RawType | None:
    """The raw type of a tag, or None when this type cannot be written at all."""
    name = type_name(tag)
    if name is None:
        return ANY
    return TYPES.get(name)


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def to_raw(value: object, t: RawType, scale: float = 1.0, offset: float = 0.0) -> Scalar:
    """The raw value that makes the device hold `value` (engineering units). Raises
    ConversionError."""
    if t.kind == "bool" or (t.kind == "any" and isinstance(value, bool)):
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise ConversionError("wrong_type", f"{value!r} is not a bool (true/false) for {t.name}")
    if t.kind == "str" or (t.kind == "any" and isinstance(value, str)):
        if not isinstance(value, str):
            raise ConversionError("wrong_type", f"{value!r} is not text for {t.name}")
        return value
    number = _number(value)
    if number is None:
        raise ConversionError("wrong_type", f"{value!r} is not a number for {t.name}")
    if not math.isfinite(number):
        raise ConversionError("not_finite", f"{value!r} is not a finite number")
    if scale == 0:
        raise ConversionError("scale_zero", "scale 0 cannot be inverted")
    identity = scale == 1.0 and offset == 0.0
    if t.kind == "any":
        # The device's type decides (the driver converts or refuses): a whole number is
        # sent as an integer, which integer and floating types alike accept.
        raw = number if identity else (number - offset) / scale
        if isinstance(raw, float) and raw.is_integer() and abs(raw) < 2**63:
            return int(raw)
        return raw
    if t.kind == "int":
        if identity and isinstance(number, int):
            whole = number
        else:
            try:
                exact = (number - offset) / scale
                whole = round(exact)
            except (OverflowError, ValueError):
                raise ConversionError(
                    "out_of_range", f"{value!r} is out of range: {t.describe()}"
                ) from None
        lo, hi = t.int_range()
        if not lo <= whole <= hi:
            shown = "" if identity else f" (raw {whole:,})"
            raise ConversionError(
                "out_of_range", f"{value!r} is out of range{shown}: {t.describe()}"
            )
        return whole
    raw = float(number) if identity else (number - offset) / scale
    if not math.isfinite(raw):
        raise ConversionError("out_of_range", f"{value!r} is out of range: {t.describe()}")
    if t.bits == 32:
        if abs(raw) > FLOAT32_MAX:
            raise ConversionError("out_of_range", f"{value!r} is out of range: {t.describe()}")
        raw = struct.unpack("<f", struct.pack("<f", raw))[0]
    return raw


def engineering_range(t: RawType, scale: float, offset: float) -> tuple[float, float] | None:
    """The engineering values an integer or float32 tag can hold with this scale and
    offset (for `validate`), or None when unbounded or not numeric."""
    if t.kind == "int":
        lo, hi = t.int_range()
    elif t.kind == "float" and t.bits == 32:
        return (-FLOAT32_MAX * abs(scale) + offset, FLOAT32_MAX * abs(scale) + offset)
    else:
        return None
    a, b = lo * scale + offset, hi * scale + offset
    return (min(a, b), max(a, b))


def values_match(
    raw_written: object,
    raw_held: object,
    value: object,
    held: object,
    tolerance: float,
    *,
    device_type: bool = False,
) -> bool:
    """Whether a read-back matches a write. Tolerance 0: the raw value read back is the raw
    value written (float32 rounding is already in the raw value). Otherwise the value read
    back (engineering units, `held`) is within `tolerance` of the value asked for.
    device_type: the write went out as the device's own type (type_name None), so a
    float32 node holding the float rounded to float32 holds what was asked for."""
    if isinstance(raw_written, bool) or isinstance(raw_held, bool):
        return type(raw_written) is type(raw_held) and raw_written == raw_held
    if not tolerance:
        rounded = (
            device_type
            and type(raw_written) is float
            and type(raw_held) is float
            and raw_written != raw_held
            and abs(raw_written) <= FLOAT32_MAX
        )
        if rounded:
            return bool(struct.unpack("<f", struct.pack("<f", raw_written))[0] == raw_held)
        return type(raw_held) in (int, float, str) and raw_written == raw_held
    a, b = _number(value), _number(held)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= tolerance
