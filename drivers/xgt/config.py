"""Configuration of an LS ELECTRIC XGT PLC reached over FEnet (the `protocol: xgt` entries).

Addresses are written as LS ELECTRIC's direct variables: `%` + area letter + size letter +
offset, e.g. `%MW100`, `%DD20`, `%PX15`, `%MB7`. The size letter is X (bit), B (byte),
W (word, 16 bit), D (double word) or L (long word, 64 bit), and the offset counts units of
that size from the start of the area: `%MW100` is bytes 200-201 of M, `%MD50` bytes 200-203,
`%MX1601` bit 1 of word 100 (100 x 16 + 1). XGT memory is little-endian, so the word order
of a 32/64-bit value is always low word first.

The areas a CPU serves differ between the MK-style CPUs (XGK, XGB MK) and the IEC ones
(XGI, XGR, XGB IEC); `AREAS` lists them and a tag in an area its CPU does not serve is a
config error, not a bad sample.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from drivers.base import DeviceCommon, TagCommon

CpuType = Literal["XGK", "XGI", "XGR", "XGB_MK", "XGB_IEC"]
DataType = Literal[
    "bool",
    "bit",
    "int8",
    "uint8",
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
SizeLetter = Literal["X", "B", "W", "D", "L"]

#: Bytes per unit of each size letter (X is a bit: 0 bytes, handled apart).
UNIT_BYTES: dict[str, int] = {"X": 0, "B": 1, "W": 2, "D": 4, "L": 8}

#: Bytes a value of each type occupies (string: its `length`; bool: part of one byte).
TYPE_BYTES: dict[str, int] = {
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
}

#: The type a tag gets when it names none, by size letter.
DEFAULT_TYPE: dict[str, DataType] = {
    "X": "bool",
    "B": "uint8",
    "W": "uint16",
    "D": "uint32",
    "L": "uint64",
}

#: Device areas each CPU family serves over FEnet (LS ELECTRIC FEnet manual, chapter
#: "Dedicated protocol", tables of variables per PLC type).
_MK_AREAS = frozenset("PMKFTCLNDR")
_IEC_AREAS = frozenset("IQMRWFKLNU")
AREAS: dict[str, frozenset[str]] = {
    "XGK": _MK_AREAS,
    "XGB_MK": _MK_AREAS,
    "XGI": _IEC_AREAS,
    "XGR": _IEC_AREAS,
    "XGB_IEC": _IEC_AREAS,
}
#: Areas whose bit (X) access reads something else than the bits of the word memory:
#: timer and counter contacts (a timer's byte/word is its current value).
CONTACT_AREAS = frozenset("TC")
#: Areas that answer bit access (X) over FEnet, per CPU family.
BIT_AREAS: dict[str, frozenset[str]] = {
    "XGK": frozenset("PMKFTCL"),
    "XGB_MK": frozenset("PMKFTCL"),
    "XGI": frozenset("IQMRWFKLNU"),
    "XGR": frozenset("IQMRWFKLNU"),
    "XGB_IEC": frozenset("IQMRWFKLNU"),
}
#: Areas the driver does not write, per CPU family, and why (FEnet itself documents no
#: refusal for them; what a write would do is why the driver refuses it).
READ_ONLY_AREAS: dict[str, dict[str, str]] = {
    "XGK": {"F": "F holds the CPU's system flags"},
    "XGB_MK": {"F": "F holds the CPU's system flags"},
    "XGI": {
        "F": "F holds the CPU's system flags",
        "I": "I is refreshed from the input modules every scan, so a written value does not last",
    },
    "XGR": {
        "F": "F holds the CPU's system flags",
        "I": "I is refreshed from the input modules every scan, so a written value does not last",
    },
    "XGB_IEC": {
        "F": "F holds the CPU's system flags",
        "I": "I is refreshed from the input modules every scan, so a written value does not last",
    },
}

#: CPU info byte of the request header (Application Header, "CPU Info").
CPU_INFO: dict[str, int] = {"XGK": 0xA0, "XGI": 0xA4, "XGR": 0xA8, "XGB_MK": 0xB0, "XGB_IEC": 0xB4}

_ADDRESS = re.compile(r"^%([A-Z])([XBWDL])(\d{1,7})$")


class Address:
    """A parsed direct variable: area, size letter and offset (in units of the size)."""

    __slots__ = ("area", "offset", "size", "text")

    def __init__(self, area: str, size: str, offset: int) -> None:
        self.area = area
        self.size = size
        self.offset = offset
        self.text = f"%{area}{size}{offset}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """`%MW100` → Address('M', 'W', 100). Raises ValueError with what is allowed."""
        match = _ADDRESS.match(text.strip().upper())
        if match is None:
            hint = ""
            if "." in text:
                hint = " (dotted notation such as %IX0.1.5 is not supported: write the flat offset)"
            raise ValueError(
                f"address {text!r}: use a direct variable %<area><size><offset>, e.g. %MW100, "
                f"%DD20, %PX15 (size X, B, W, D or L){hint}"
            )
        area, size, offset = match.group(1), match.group(2), int(match.group(3))
        return cls(area, size, offset)

    @property
    def bit_index(self) -> int | None:
        """The bit number within the area for an X address, None otherwise."""
        return self.offset if self.size == "X" else None

    @property
    def byte_offset(self) -> int:
        """First byte of the address in its area (the byte holding the bit for X)."""
        if self.size == "X":
            return self.offset // 8
        return self.offset * UNIT_BYTES[self.size]

    def __repr__(self) -> str:
        return f"Address({self.text})"


class XgtTag(TagCommon):
    """One value read from an XGT PLC."""

    address: str = Field(
        description="Direct variable: %<area><size><offset>, e.g. %MW100 (word 100 of M), "
        "%DD20 (double word 20 of D), %PX15 (bit 15 of P). Size X, B, W, D or L; the offset "
        "counts units of that size."
    )
    type: DataType | None = Field(
        default=None,
        description="Data type. Default by size letter: X bool, B uint8, W uint16, D uint32, "
        "L uint64. A wider type spans the following units (%MW100 float32 = words 100-101).",
    )
    bit: int | None = Field(
        default=None, ge=0, le=15, description="type bit: bit of the word/byte, 0 = LSB."
    )
    length: int | None = Field(
        default=None, ge=1, le=1400, description="type string: number of bytes (1 char each)."
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        Address.parse(v)
        return v.strip().upper()

    @model_validator(mode="after")
    def _consistent(self) -> XgtTag:
        addr = self.parsed()
        kind = self.resolved_type()
        if addr.size == "X" and kind != "bool":
            raise ValueError(f"address {addr.text} is a bit: its type is bool")
        if addr.size != "X" and kind == "bool":
            raise ValueError(
                f"type bool needs a bit address (%{addr.area}X...); for a bit of a word use "
                "type bit with 'bit'"
            )
        if kind == "bit":
            limit = 8 * UNIT_BYTES[addr.size]
            if self.bit is None:
                raise ValueError("type bit needs 'bit' (0-15)")
            if self.bit >= limit:
                raise ValueError(f"'bit' {self.bit} is outside {addr.text} ({limit} bits)")
        elif self.bit is not None:
            raise ValueError("'bit' is only for type bit")
        if kind == "string" and self.length is None:
            raise ValueError("type string needs 'length' (bytes)")
        if kind != "string" and self.length is not None:
            raise ValueError("'length' is only for type string")
        if kind in TYPE_BYTES and TYPE_BYTES[kind] < UNIT_BYTES[addr.size]:
            raise ValueError(
                f"type {kind} ({TYPE_BYTES[kind]} bytes) is narrower than {addr.text} "
                f"({UNIT_BYTES[addr.size]} bytes): use a smaller size letter"
            )
        return self

    def parsed(self) -> Address:
        """The parsed address."""
        return Address.parse(self.address)

    def resolved_type(self) -> DataType:
        """The type, or the default of the address' size letter."""
        return self.type or DEFAULT_TYPE[self.parsed().size]

    def byte_count(self) -> int:
        """Bytes the value occupies from `parsed().byte_offset` (1 for a bool)."""
        kind = self.resolved_type()
        if kind == "bool":
            return 1
        if kind == "bit":
            return UNIT_BYTES[self.parsed().size]
        if kind == "string":
            return self.length or 1
        return TYPE_BYTES[kind]


class XgtDevice(DeviceCommon):
    """An XGK/XGI/XGR/XGB CPU reached through its FEnet module (or built-in Ethernet)."""

    protocol: Literal["xgt"]
    host: str = Field(description="Host name or IP address of the FEnet module.")
    port: int = Field(
        default=2004,
        ge=0,
        le=65535,
        description="TCP port of the XGT dedicated protocol (2004; 0 in simulator mode: any).",
    )
    cpu: CpuType = Field(
        default="XGK",
        description="CPU family: XGK, XGI, XGR, XGB_MK or XGB_IEC; decides the areas served.",
    )
    fenet_base: int = Field(default=0, ge=0, le=15, description="Base number of the FEnet module.")
    fenet_slot: int = Field(default=0, ge=0, le=15, description="Slot number of the FEnet module.")
    max_bytes_per_request: int = Field(
        default=1400,
        ge=2,
        le=1400,
        description="Largest continuous block read in one request, in bytes (FEnet: 1400).",
    )
    max_gap_bytes: int = Field(
        default=0,
        ge=0,
        le=1398,
        description="Unused bytes allowed between two tags merged into one block read.",
    )
    max_variables_per_request: int = Field(
        default=16,
        ge=1,
        le=16,
        description="Variables in one individual read (FEnet: 16).",
    )
    isolation_retry_s: float = Field(
        default=60.0,
        gt=0,
        description="A request the PLC refused is split to isolate the refused tags; this "
        "often the whole request is tried again.",
    )
    tags: list[XgtTag] = Field(min_length=1, description="The values to read.")

    def write_refusal(self, tag: str) -> str | None:
        """Areas the driver does not write (`READ_ONLY_AREAS`: system flags, IEC inputs)
        and timer/counter contacts (set by the timer/counter: write its current value)."""
        found = next((t for t in self.tags if t.name == tag), None)
        if found is None:
            return f"no tag {tag!r} on device {self.name!r}"
        addr = found.parsed()
        why = READ_ONLY_AREAS[self.cpu].get(addr.area)
        if why is not None:
            return f"area {addr.area} is not written: {why}"
        if addr.area in CONTACT_AREAS and addr.size == "X":
            return (
                f"{addr.text} is a timer/counter contact, set by the timer/counter; write its "
                f"current value (%{addr.area}W{addr.offset}) instead"
            )
        return None

    @model_validator(mode="after")
    def _areas(self) -> XgtDevice:
        areas, bits = AREAS[self.cpu], BIT_AREAS[self.cpu]
        problems = []
        for tag in self.tags:
            addr = tag.parsed()
            if addr.area not in areas:
                problems.append(
                    f"tag {tag.name!r}: area {addr.area} is not served by {self.cpu} "
                    f"(areas: {', '.join(sorted(areas))})"
                )
            elif addr.size == "X" and addr.area not in bits:
                problems.append(
                    f"tag {tag.name!r}: {self.cpu} has no bit access to area {addr.area}; read "
                    f"the word (%{addr.area}W{addr.offset // 16}) with type bit, bit "
                    f"{addr.offset % 16}"
                )
            elif addr.area in CONTACT_AREAS and addr.size != "X" and tag.byte_count() > 2:
                problems.append(
                    f"tag {tag.name!r}: the current value of a timer/counter is one word"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self
