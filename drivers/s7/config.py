"""Configuration of a Siemens S7 device and its tags (the `protocol: s7` entries).

Addresses are written as in STEP 7 / TIA Portal (absolute addressing), with or without
the leading `%`, in English (I/Q) or German (E/A) mnemonics:

    DB1.DBX0.3   bit 3 of byte 0 of DB1         M10.7 / MX10.7   bit 7 of merker byte 10
    DB1.DBB4     byte 4 of DB1                  MB10, IB0, QB2   a byte
    DB1.DBW6     word at byte 6                 MW10, IW64, QW4  a word (2 bytes)
    DB1.DBD8     double word at byte 8          MD20, ID4, QD0   a double word (4 bytes)

The size letter (X, B, W, D) must agree with the tag's `type`: X for bool; B for byte;
W for int and word; D for dint, dword and real. LREAL, STRING and DATE_AND_TIME have no
size letter of their own: write their first byte (`DB1.DBB10`). Values are big-endian,
as the PLC stores them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from drivers.base import DeviceCommon, TagCommon

Area = Literal["DB", "M", "I", "Q"]
DataType = Literal[
    "bool", "byte", "int", "dint", "word", "dword", "real", "lreal", "string", "date_and_time"
]
ConnectionType = Literal["pg", "op", "basic"]

#: Bytes a value occupies (STRING: 2 + its declared length).
TYPE_SIZE: dict[str, int] = {
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

_LETTER_WIDTH = {"X": 0, "B": 1, "W": 2, "D": 4}
_TYPE_LETTERS: dict[str, str] = {
    "bool": "X",
    "byte": "B",
    "int": "W",
    "word": "W",
    "dint": "D",
    "dword": "D",
    "real": "D",
    "lreal": "B",
    "string": "B",
    "date_and_time": "B",
}
_DEFAULT_TYPE = {"X": "bool", "B": "byte", "W": "int", "D": "dint"}
_AREA_ALIAS: dict[str, Area] = {"M": "M", "I": "I", "E": "I", "Q": "Q", "A": "Q"}
#: S7 area codes on the wire.
AREA_CODE: dict[Area, int] = {"I": 0x81, "Q": 0x82, "M": 0x83, "DB": 0x84}
CONNECTION_TYPE: dict[ConnectionType, int] = {"pg": 1, "op": 2, "basic": 3}

_DB_RE = re.compile(r"^%?DB(\d{1,5})\.DB([XBWD])(\d{1,7})(?:\.(\d+))?$", re.IGNORECASE)
_AREA_RE = re.compile(r"^%?([MIEQA])([XBWD]?)(\d{1,7})(?:\.(\d+))?$", re.IGNORECASE)

MAX_OFFSET = (1 << 21) - 1  # the 3-byte bit address of a request holds 2**21 bytes


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address: area, DB number (0 outside DBs), byte offset, bit, size letter."""

    area: Area
    db: int
    byte: int
    bit: int | None
    letter: str

    def text(self) -> str:
        """Canonical notation, e.g. `DB1.DBX0.3`, `MW10`."""
        bit = f".{self.bit}" if self.bit is not None else ""
        if self.area == "DB":
            return f"DB{self.db}.DB{self.letter}{self.byte}{bit}"
        letter = "" if self.letter == "X" else self.letter
        return f"{self.area}{letter}{self.byte}{bit}"


def parse_address(text: str) -> Address:
    """'DB1.DBX0.3' → Address('DB', 1, 0, 3, 'X'); raises ValueError with the notation."""
    s = text.strip()
    m = _DB_RE.match(s)
    if m:
        area: Area = "DB"
        db = int(m.group(1))
        letter, byte, bit = m.group(2).upper(), int(m.group(3)), m.group(4)
        if not 1 <= db <= 65535:
            raise ValueError(f"address {text!r}: DB numbers are 1-65535")
    else:
        m = _AREA_RE.match(s)
        if not m:
            raise ValueError(
                f"address {text!r}: write DB<n>.DBX<byte>.<bit>, DB<n>.DBB/DBW/DBD<byte>, "
                "or M/I/Q (E/A) with X/B/W/D, e.g. M10.7, MW10, IB0, QD4"
            )
        area, db = _AREA_ALIAS[m.group(1).upper()], 0
        letter, byte, bit = (m.group(2) or "X").upper(), int(m.group(3)), m.group(4)
    if letter == "X":
        if bit is None:
            raise ValueError(f"address {text!r}: a bit address needs .<bit> (0-7), e.g. M10.7")
        if not 0 <= int(bit) <= 7:
            raise ValueError(f"address {text!r}: bit numbers are 0-7")
    elif bit is not None:
        raise ValueError(f"address {text!r}: only X (bit) addresses have a .<bit>")
    if byte > MAX_OFFSET:
        raise ValueError(f"address {text!r}: byte offset above {MAX_OFFSET}")
    return Address(area, db, byte, int(bit) if bit is not None else None, letter)


class S7Tag(TagCommon):
    """One value read from an S7 PLC."""

    address: str = Field(
        description="Absolute address as in TIA Portal: DB1.DBX0.3, DB1.DBW2, MW10, M0.1, "
        "IB0, QD4 (a leading % and the German E/A are accepted)."
    )
    type: DataType | None = Field(
        default=None,
        description="bool, byte, int, dint, word, dword, real, lreal, string, date_and_time. "
        "Default from the size letter: X bool, B byte, W int, D dint.",
    )
    length: int | None = Field(
        default=None,
        ge=1,
        le=254,
        description="type string: declared length of the STRING[n] (default 254).",
    )

    @field_validator("address")
    @classmethod
    def _address_syntax(cls, v: str) -> str:
        parse_address(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> S7Tag:
        addr = parse_address(self.address)
        t = self.resolved_type()
        want = _TYPE_LETTERS[t]
        if addr.letter != want:
            hint = {
                "X": "a bit address such as DB1.DBX0.0 or M0.0",
                "B": "a byte address such as DB1.DBB0 or MB0",
                "W": "a word address such as DB1.DBW0 or MW0",
                "D": "a double-word address such as DB1.DBD0 or MD0",
            }[want]
            raise ValueError(f"type {t} at {self.address!r}: write {hint}")
        if t != "string" and self.length is not None:
            raise ValueError("'length' is only for type string")
        if addr.byte + self.size() - 1 > MAX_OFFSET:
            raise ValueError(f"value runs past byte {MAX_OFFSET}")
        return self

    def resolved_address(self) -> Address:
        return parse_address(self.address)

    def resolved_type(self) -> DataType:
        if self.type is not None:
            return self.type
        letter = parse_address(self.address).letter
        return _DEFAULT_TYPE[letter]  # type: ignore[return-value]

    def size(self) -> int:
        """Bytes the value occupies in the PLC."""
        t = self.resolved_type()
        if t == "string":
            return 2 + (self.length or 254)
        return TYPE_SIZE[t]


def parse_tsap(text: str) -> int:
    """'01.02', '0102', '0x0102' → 0x0102 (as shown in TIA Portal / STEP 7 NetPro)."""
    s = text.strip().lower().removeprefix("0x").replace(".", "").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,4}", s):
        raise ValueError(f"TSAP {text!r}: write two hexadecimal bytes, e.g. 01.02 or 0x0102")
    return int(s, 16)


class S7Device(DeviceCommon):
    """A Siemens S7-300/400/1200/1500 CPU (or CP) reached over ISO-on-TCP (port 102)."""

    protocol: Literal["s7"]
    host: str = Field(description="Host name or IP address of the CPU or CP.")
    port: int = Field(
        default=102, ge=0, le=65535, description="TCP port (0 in simulator mode: any free port)."
    )
    rack: int = Field(default=0, ge=0, le=7, description="Rack of the CPU (0 on almost all).")
    slot: int = Field(
        default=1,
        ge=0,
        le=31,
        description="Slot of the CPU: 1 on S7-1200/1500 (0 also works), 2 on S7-300, "
        "the CPU's slot in the hardware configuration on S7-400.",
    )
    connection_type: ConnectionType = Field(
        default="pg",
        description="pg, op or basic: the connection resource used (the remote TSAP's "
        "high byte 1, 2 or 3).",
    )
    local_tsap: str = Field(
        default="01.00", description="Our TSAP, two hexadecimal bytes (e.g. 01.00, 10.00)."
    )
    remote_tsap: str | None = Field(
        default=None,
        description="The PLC's TSAP (e.g. 03.01 for a LOGO! or a CP); when given it "
        "replaces rack, slot and connection_type.",
    )
    pdu_size: int = Field(
        default=480,
        ge=240,
        le=960,
        description="PDU size requested and planned for: 240 on S7-300/1200, 480 on "
        "S7-400, 960 on S7-1500. A PLC that grants less makes the driver re-plan.",
    )
    max_items_per_request: int = Field(
        default=20,
        ge=1,
        le=80,
        description="Variables in one multi-variable read (the PDU size may allow fewer).",
    )
    max_gap: int = Field(
        default=4,
        ge=0,
        le=256,
        description="Unused bytes allowed between two tags read as one variable.",
    )
    isolation_retry_s: float = Field(
        default=60.0,
        gt=0,
        description="A variable the PLC refused is read tag by tag; this often it is "
        "tried whole again.",
    )
    tags: list[S7Tag] = Field(min_length=1, description="The values to read.")

    @field_validator("local_tsap", "remote_tsap")
    @classmethod
    def _tsap_syntax(cls, v: str | None) -> str | None:
        if v is not None:
            parse_tsap(v)
        return v

    @model_validator(mode="after")
    def _tsap_or_rack_slot(self) -> S7Device:
        if self.remote_tsap is not None:
            clash = {"rack", "slot", "connection_type"} & self.model_fields_set
            if clash:
                raise ValueError(
                    f"remote_tsap replaces {', '.join(sorted(clash))}: give one or the other"
                )
        return self

    def tsaps(self) -> tuple[int, int]:
        """(local TSAP, remote TSAP) as sent in the COTP connection request."""
        local = parse_tsap(self.local_tsap)
        if self.remote_tsap is not None:
            return local, parse_tsap(self.remote_tsap)
        return local, (CONNECTION_TYPE[self.connection_type] << 8) | (self.rack << 5) | self.slot

    def write_refusal(self, tag: str) -> str | None:
        """Inputs (I/E) are not written: the CPU overwrites the process image of the inputs
        from the modules every cycle. DB, M and Q are written with write variable."""
        found = next((t for t in self.tags if t.name == tag), None)
        if found is None:
            return f"no tag {tag!r} on device {self.name!r}"
        if found.resolved_address().area == "I":
            return (
                "inputs (I) are not written: the CPU refreshes them from the input modules "
                "every cycle; write an M, Q or DB address the program reads instead"
            )
        return None

    def check(self, *, simulate: bool | None = None) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems the field validators cannot see, as (location in this device, message):
        a value larger than one answer at `pdu_size` (the plan cannot be made), port 0
        outside simulator mode. The agent's loader reports them with file and line."""
        from drivers.s7.plan import max_variable_bytes

        out: list[tuple[tuple[str | int, ...], str]] = []
        if simulate is False and self.port == 0:
            out.append((("port",), "port 0 is only for simulator mode (run --simulate)"))
        cap = max_variable_bytes(self.pdu_size)
        for index, tag in enumerate(self.tags):
            if tag.size() > cap:
                t = tag.resolved_type()
                out.append(
                    (
                        ("tags", index, "length" if t == "string" else "type"),
                        f"a {t} of {tag.size()} bytes is larger than the {cap} bytes one "
                        f"answer carries at pdu_size {self.pdu_size}"
                        + (": declare a shorter length" if t == "string" else ""),
                    )
                )
        return out
