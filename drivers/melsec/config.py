"""Configuration of a MELSEC device read over SLMP, and its tags (`protocol: melsec`).

Addresses are written as in GX Works: a device name and a number (`D100`, `M0`, `X1F`,
`W1A0`, `ZR100`), or a bit of a word device with a hexadecimal bit number (`D100.F`).
The radix of the number belongs to the device name and, for X and Y, to the CPU series:
X and Y are hexadecimal on Q, L and iQ-R, octal on iQ-F (FX5); B, W, SB, SW and ZR are
hexadecimal everywhere; the others are decimal. So the same text means different
devices on different series, which is why the device's `series` is required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from drivers.base import DeviceCommon, TagCommon

Series = Literal["q", "l", "iq-r", "iq-f"]
Frame = Literal["3e", "4e"]
DataType = Literal[
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
Radix = Literal[8, 10, 16]

#: Words a value occupies (bool in a word device: the one word holding the bit).
WORD_COUNT: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}

#: Largest device number a 3E/4E request can carry (3-byte field).
MAX_DEVICE_NUMBER = 0xFFFFFF


@dataclass(frozen=True, slots=True)
class DeviceKind:
    """One MELSEC device family: its binary device code, bit or word, and its radix."""

    name: str
    code: int
    is_bit: bool
    radix: Radix
    description: str


_KINDS = (
    DeviceKind("SM", 0x91, True, 10, "special relay"),
    DeviceKind("SD", 0xA9, False, 10, "special register"),
    DeviceKind("X", 0x9C, True, 16, "input"),
    DeviceKind("Y", 0x9D, True, 16, "output"),
    DeviceKind("M", 0x90, True, 10, "internal relay"),
    DeviceKind("L", 0x92, True, 10, "latch relay"),
    DeviceKind("F", 0x93, True, 10, "annunciator"),
    DeviceKind("B", 0xA0, True, 16, "link relay"),
    DeviceKind("SB", 0xA1, True, 16, "link special relay"),
    DeviceKind("D", 0xA8, False, 10, "data register"),
    DeviceKind("W", 0xB4, False, 16, "link register"),
    DeviceKind("SW", 0xB5, False, 16, "link special register"),
    DeviceKind("TS", 0xC1, True, 10, "timer contact"),
    DeviceKind("TN", 0xC2, False, 10, "timer current value"),
    DeviceKind("CS", 0xC4, True, 10, "counter contact"),
    DeviceKind("CN", 0xC5, False, 10, "counter current value"),
    DeviceKind("R", 0xAF, False, 10, "file register (block)"),
    DeviceKind("ZR", 0xB0, False, 16, "file register (serial)"),
)
DEVICE_KINDS: dict[str, DeviceKind] = {k.name: k for k in _KINDS}
KIND_BY_CODE: dict[int, DeviceKind] = {k.code: k for k in _KINDS}
# Longest names first, so "SM1" is SM 1 and not S followed by garbage.
_NAMES = sorted(DEVICE_KINDS, key=len, reverse=True)

#: Device families a series does not have (the CPU answers an end code for them).
ABSENT: dict[Series, dict[str, str]] = {
    "iq-f": {"ZR": "iQ-F has no ZR: use R (R0-R32767)"},
    "q": {},
    "l": {},
    "iq-r": {},
}

#: Device families the driver refuses to write, and why. SLMP itself would accept most
#: of these writes; what they would do to a running CPU is why they are refused.
READ_ONLY: dict[str, str] = {
    "X": "inputs are refreshed from the input modules every scan, so a written value does "
    "not last; write a Y, M or D the program reads instead",
    "SM": "special relays are set by the CPU; writing one changes how the CPU runs",
    "SD": "special registers are set by the CPU; writing one changes how the CPU runs",
    "SB": "link special relays are set by the network module",
    "SW": "link special registers are set by the network module",
    "TS": "timer contacts are set by the timer; write its current value (TN) instead",
    "CS": "counter contacts are set by the counter; write its current value (CN) instead",
}

#: Batch-read caps per request: words (all series), bits (bit units) per series.
MAX_WORDS = 960
MAX_BITS: dict[Series, int] = {"q": 7168, "l": 7168, "iq-r": 7168, "iq-f": 3584}
MAX_RANDOM_POINTS = 192


def radix_of(kind: DeviceKind, series: Series) -> Radix:
    """X and Y are octal on iQ-F; every other radix is the same on all series."""
    if kind.name in ("X", "Y") and series == "iq-f":
        return 8
    return kind.radix


_RADIX_NAME = {8: "octal", 10: "decimal", 16: "hexadecimal"}
_ARTICLE = {8: "an", 10: "a", 16: "a"}


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address: device family, device number (as on the wire), bit (or None)."""

    kind: DeviceKind
    number: int
    bit: int | None = None

    def text(self, series: Series) -> str:
        """The address as GX Works writes it on `series` (`X1F`, `X37`, `D100.A`)."""
        radix = radix_of(self.kind, series)
        digits = {8: f"{self.number:o}", 10: f"{self.number}", 16: f"{self.number:X}"}[radix]
        bit = "" if self.bit is None else f".{self.bit:X}"
        return f"{self.kind.name}{digits}{bit}"


def split_address(text: str) -> tuple[DeviceKind, str, str | None]:
    """'D100.F' → (D, '100', 'F'). Raises ValueError naming what is wrong."""
    raw = text.strip().upper()
    for name in _NAMES:
        if raw.startswith(name) and len(raw) > len(name):
            rest = raw[len(name) :]
            number, dot, bit = rest.partition(".")
            if not number:
                break
            return DEVICE_KINDS[name], number, (bit if dot else None)
    known = ", ".join(k.name for k in _KINDS)
    raise ValueError(f"address {text!r}: expected a device name ({known}) and a number, e.g. D100")


def parse_address(text: str, series: Series) -> Address:
    """Parse `text` as written on `series`. Raises ValueError with the reason."""
    kind, digits, bit_text = split_address(text)
    radix = radix_of(kind, series)
    try:
        number = int(digits, radix)
    except ValueError:
        hint = ""
        if kind.name in ("X", "Y"):
            hint = f" (X and Y are {_RADIX_NAME[radix]} on {series})"
        raise ValueError(
            f"address {text!r}: {digits!r} is not {_ARTICLE[radix]} {_RADIX_NAME[radix]} "
            f"{kind.name} number{hint}"
        ) from None
    if number > MAX_DEVICE_NUMBER:
        raise ValueError(f"address {text!r}: device number is above {MAX_DEVICE_NUMBER:#X}")
    absent = ABSENT[series].get(kind.name)
    if absent:
        raise ValueError(f"address {text!r}: {absent}")
    bit: int | None = None
    if bit_text is not None:
        if kind.is_bit:
            raise ValueError(f"address {text!r}: {kind.name} is a bit device; '.n' is for words")
        if len(bit_text) != 1 or bit_text not in "0123456789ABCDEF":
            raise ValueError(f"address {text!r}: the bit after '.' is one hex digit, 0-F")
        bit = int(bit_text, 16)
    return Address(kind, number, bit)


class MelsecTag(TagCommon):
    """One value read from a MELSEC CPU."""

    address: str = Field(
        description="Device and number as in GX Works: D100, M0, X1F (hex on Q/L/iQ-R, "
        "octal on iQ-F), W1A0, ZR100, or a bit of a word: D100.F (hex bit number)."
    )
    type: DataType | None = Field(
        default=None,
        description="Data type. Default: bool for bit devices and word bits (D100.3), "
        "int16 for word devices. Bit devices hold bool only.",
    )
    length: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORDS,
        description="type string: number of words (2 characters each, low byte first).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MelsecTag:
        kind, _, bit = split_address(self.address)
        t = self.resolved_type()
        if kind.is_bit and t != "bool":
            raise ValueError(f"{kind.name} is a bit device ({kind.description}): use type bool")
        if bit is not None and t != "bool":
            raise ValueError(f"{self.address!r} is one bit of a word: use type bool")
        if not kind.is_bit and bit is None and t == "bool":
            raise ValueError(
                f"{kind.name} is a word device: type bool needs a bit, e.g. {kind.name}100.0"
            )
        if t == "string" and self.length is None:
            raise ValueError("type string needs 'length' (number of words)")
        if t != "string" and self.length is not None:
            raise ValueError("'length' is only for type string")
        return self

    def resolved_type(self) -> DataType:
        if self.type is not None:
            return self.type
        kind, _, bit = split_address(self.address)
        return "bool" if kind.is_bit or bit is not None else "int16"

    def word_count(self) -> int:
        """Words the value occupies in a word device (1 point in a bit device)."""
        t = self.resolved_type()
        return (self.length or 1) if t == "string" else WORD_COUNT[t]


class MelsecDevice(DeviceCommon):
    """A MELSEC CPU (or an Ethernet module) reached over SLMP, binary code, TCP or UDP."""

    protocol: Literal["melsec"]
    series: Series = Field(
        description="CPU series: q, l, iq-r or iq-f (FX5). Decides the radix of X/Y "
        "(octal on iq-f) and the batch-read bit cap (3584 on iq-f, 7168 otherwise)."
    )
    host: str = Field(description="Host name or IP address of the CPU or Ethernet module.")
    port: int = Field(
        ge=0,
        le=65535,
        description="TCP port of the SLMP (MC protocol) connection set in the PLC's "
        "parameters (0 in simulator mode: any free port).",
    )
    transport: Literal["tcp", "udp"] = Field(
        default="tcp",
        description="tcp, or udp (the PLC's SLMP entry must be UDP; use frame 4e with it).",
    )
    frame: Frame = Field(
        default="3e",
        description="3e, or 4e (serial numbers pair answers with requests; enables retries).",
    )
    network: int = Field(default=0, ge=0, le=255, description="Network number (0: own).")
    station: int = Field(
        default=255, ge=0, le=255, description="Station (PC) number (255: the CPU connected to)."
    )
    module_io: int = Field(
        default=0x03FF,
        ge=0,
        le=0xFFFF,
        description="Request destination module I/O number (0x03FF: own CPU; 0x03E0-0x03E3: "
        "CPU 1-4 of a multiple CPU system).",
    )
    multidrop_station: int = Field(
        default=0, ge=0, le=255, description="Request destination multidrop station number."
    )
    max_words_per_request: int = Field(
        default=MAX_WORDS, ge=1, le=MAX_WORDS, description="Largest word batch read (960)."
    )
    max_bits_per_request: int | None = Field(
        default=None,
        ge=1,
        le=7168,
        description="Largest bit batch read; default 3584 on iq-f, 7168 otherwise.",
    )
    max_gap: int = Field(
        default=16,
        ge=0,
        le=7167,
        description="Unused words (bits) allowed between two tags merged into one batch read "
        "(a CPU reads unused numbers as 0, so a small gap only costs a few bytes).",
    )
    random_read: bool = Field(
        default=True,
        description="Pool small scattered batch reads into random reads (command 0403) when "
        "that saves requests.",
    )
    max_random_points: int = Field(
        default=MAX_RANDOM_POINTS,
        ge=1,
        le=MAX_RANDOM_POINTS,
        description="Word + double-word points per random read (192).",
    )
    isolation_retry_s: float = Field(
        default=60.0,
        gt=0,
        description="A request the CPU refused for its addresses is split to isolate the "
        "refused tags; this often the whole request is tried again.",
    )
    tags: list[MelsecTag] = Field(min_length=1, description="The values to read.")

    @model_validator(mode="after")
    def _addresses(self) -> MelsecDevice:
        problems = []
        for i, tag in enumerate(self.tags):
            try:
                addr = parse_address(tag.address, self.series)
            except ValueError as exc:
                problems.append(f"tags[{i}] {tag.name!r}: {exc}")
                continue
            end = addr.number + (1 if addr.kind.is_bit else tag.word_count())
            if end - 1 > MAX_DEVICE_NUMBER:
                problems.append(f"tags[{i}] {tag.name!r}: value runs past the largest number")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def write_refusal(self, tag: str) -> str | None:
        """Device families the driver does not write (see `READ_ONLY`); every other
        family is written with batch write 1401."""
        found = next((t for t in self.tags if t.name == tag), None)
        if found is None:
            return f"no tag {tag!r} on device {self.name!r}"
        kind, _, _ = split_address(found.address)
        why = READ_ONLY.get(kind.name)
        return f"{kind.name} ({kind.description}) is not written: {why}" if why else None

    def bit_cap(self) -> int:
        cap = MAX_BITS[self.series]
        return min(cap, self.max_bits_per_request or cap)

    def monitoring_timer(self) -> int:
        """The CPU's wait limit sent in every request, in units of 250 ms: the request
        timeout rounded down (at least 250 ms), so a CPU waiting on another station gives
        up with an end code before our timeout, not after it."""
        return max(1, min(0xFFFF, math.floor(self.timeout_s * 4)))

    def address_of(self, tag: MelsecTag) -> Address:
        return parse_address(tag.address, self.series)
