"""Configuration of a Modbus device and its tags (the `protocol: modbus` entries).

Addressing convention: `address` is the 0-based protocol address, exactly what goes on
the wire. The classic notation is accepted as a string and converted:
"40001" / "400001" → holding register 0, "30001" → input register 0,
"10001" → discrete input 0, "00001" → coil 0. When the classic form is used the table
is implied and must agree with `table` if that is given too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from drivers.base import DeviceCommon, TagCommon

Table = Literal["coil", "discrete_input", "holding", "input"]
DataType = Literal[
    "bool",
    "bit",
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
# Byte order of a value, in the industry's letters: A is the most significant byte as
# it would be written big-endian. 32-bit orders apply to 64-bit values word-pair-wise
# (ABCD → ABCDEFGH, CDAB → GHEFCDAB, BADC → BADCFEHG, DCBA → HGFEDCBA).
ByteOrder = Literal["ABCD", "BADC", "CDAB", "DCBA"]

REGISTER_COUNT: dict[str, int] = {
    "bool": 1,
    "bit": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}

_CLASSIC_PREFIX: dict[str, Table] = {
    "0": "coil",
    "1": "discrete_input",
    "3": "input",
    "4": "holding",
}


def parse_classic_address(text: str) -> tuple[Table, int]:
    """'40001' → ('holding', 0); '400001' (6-digit form) → ('holding', 0)."""
    if not text.isdigit() or len(text) not in (5, 6) or text[0] not in _CLASSIC_PREFIX:
        raise ValueError(
            f"address {text!r}: use a 0-based number, or the classic 5/6-digit form "
            "0xxxx (coil), 1xxxx (discrete input), 3xxxx (input), 4xxxx (holding)"
        )
    number = int(text[1:])
    if number < 1:
        raise ValueError(f"address {text!r}: classic addresses start at 1 (e.g. 40001)")
    return _CLASSIC_PREFIX[text[0]], number - 1


class ModbusTag(TagCommon):
    """One value read from a Modbus device."""

    table: Table | None = Field(
        default=None,
        description="coil, discrete_input, holding or input. Defaults to holding for "
        "register types and coil for bool, or follows a classic address.",
    )
    address: int | str = Field(
        description="0-based protocol address, or classic notation as a string ('40001')."
    )
    type: DataType = Field(default="uint16", description="Data type of the value.")
    byte_order: ByteOrder | None = Field(
        default=None, description="Overrides the device's byte_order for this tag."
    )
    bit: int | None = Field(
        default=None, ge=0, le=15, description="type bit: bit number in the register, 0 = LSB."
    )
    length: int | None = Field(
        default=None, ge=1, le=125, description="type string: number of registers (2 chars each)."
    )

    @field_validator("address")
    @classmethod
    def _address_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 65535:
            raise ValueError("address must be between 0 and 65535")
        if isinstance(v, str):
            parse_classic_address(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTag:
        table = self.resolved_table()
        if self.type == "bool" and table not in ("coil", "discrete_input"):
            raise ValueError(
                "type bool reads a coil or discrete_input; use type bit with 'bit' for a "
                "bit inside a register"
            )
        if self.type != "bool" and table in ("coil", "discrete_input"):
            raise ValueError(f"table {table} holds single bits: use type bool")
        if self.type == "bit" and self.bit is None:
            raise ValueError("type bit needs 'bit' (0-15)")
        if self.type != "bit" and self.bit is not None:
            raise ValueError("'bit' is only for type bit")
        if self.type == "string" and self.length is None:
            raise ValueError("type string needs 'length' (number of registers)")
        if self.type != "string" and self.length is not None:
            raise ValueError("'length' is only for type string")
        if self.resolved_address() + self.register_count() > 65536:
            raise ValueError("value runs past address 65535")
        return self

    def resolved_table(self) -> Table:
        if isinstance(self.address, str):
            implied, _ = parse_classic_address(self.address)
            if self.table is not None and self.table != implied:
                raise ValueError(
                    f"address {self.address!r} is in table {implied}, but table is {self.table}"
                )
            return implied
        if self.table is not None:
            return self.table
        return "coil" if self.type == "bool" else "holding"

    def resolved_address(self) -> int:
        if isinstance(self.address, str):
            return parse_classic_address(self.address)[1]
        return self.address

    def register_count(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the value occupies."""
        if self.type == "string":
            return self.length or 1
        return REGISTER_COUNT[self.type]


class ModbusDevice(DeviceCommon):
    """A Modbus server (slave): reached over its own TCP connection (`host`), or as one
    unit on a shared link (`link`: a serial line, a serial device server, a TCP gateway;
    see drivers/links.py)."""

    protocol: Literal["modbus"]
    transport: Literal["tcp", "rtu", "rtu_over_tcp"] | None = Field(
        default=None,
        description="Optional check: tcp for a device with `host` or on a `tcp` link, rtu on "
        "a `serial` link, rtu_over_tcp on an `rtu_over_tcp` link.",
    )
    link: str | None = Field(
        default=None, min_length=1, description="Name of the link (under `links:`) the unit is on."
    )
    host: str | None = Field(
        default=None,
        validate_default=True,
        description="Host name or IP address of the device (without `link`).",
    )
    port: int = Field(
        default=502, ge=0, le=65535, description="TCP port (0 in simulator mode: any free port)."
    )
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id.")
    byte_order: ByteOrder = Field(
        default="ABCD", description="Default byte order of multi-register values."
    )
    max_registers_per_request: int = Field(
        default=125, ge=1, le=125, description="Largest register block read in one request."
    )
    max_bits_per_request: int = Field(
        default=2000, ge=1, le=2000, description="Largest coil/discrete block read in one request."
    )
    max_gap: int = Field(
        default=0,
        ge=0,
        le=124,
        description="Unused registers/bits allowed between two tags merged into one request.",
    )
    isolation_retry_s: float = Field(
        default=60.0,
        gt=0,
        description="A block the device refused in part (exception 2/3) is split to isolate "
        "the refused tags; this often the whole block is tried again.",
    )
    request_pause_s: float = Field(
        default=0.0, ge=0, description="Pause between requests, for devices that need one."
    )
    write_functions: Literal["single", "multiple"] = Field(
        default="single",
        description="Writes of one coil or one register: single uses function 5/6, "
        "multiple uses 15/16 (for devices that implement only those). Values of several "
        "registers always use 16.",
    )
    bit_write: Literal["mask", "read_modify_write"] = Field(
        default="mask",
        description="Writes of a `bit` tag (a bit inside a holding register): mask uses "
        "function 22 (mask write, applied by the device in one step); read_modify_write "
        "reads the register and writes it back whole (function 3 then 6/16), for devices "
        "without function 22. It overwrites a change the PLC makes to the register's other "
        "bits between the read and the write.",
    )
    tags: list[ModbusTag] = Field(min_length=1, description="The values to read.")

    def check(self, *, simulate: bool | None = None) -> list[tuple[tuple[str | int, ...], str]]:
        """The request plan (`drivers.modbus.plan`), made as the driver makes it at
        start; a host that cannot be one; port 0, which only simulator mode can serve."""
        import ipaddress
        import re

        from drivers.modbus.plan import MAX_BITS, MAX_REGISTERS, plan_device, plan_requests

        out: list[tuple[tuple[str | int, ...], str]] = []
        if self.host is not None:  # None: a unit on a shared link (checked with links)
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                label = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
                name = self.host.removesuffix(".")
                if not (0 < len(name) <= 253 and all(label.match(x) for x in name.split("."))):
                    out.append(
                        (("host",), f"{self.host!r} is neither an IP address nor a host name")
                    )
        if simulate is False and self.link is None and self.port == 0:
            out.append((("port",), "port 0 is only for simulator mode (run --simulate)"))
        if simulate:
            out.extend(self._simulate_problems())
        # An undeclared poll group is reported by the loader's own cross checks.
        groups = self.group_intervals()
        if any(t.group not in groups for t in self.tags):
            return out
        try:
            plan_device(self)
        except ValueError as exc:
            # Find the tags the plan failed on, to point at their lines.
            cap_regs = min(MAX_REGISTERS, self.max_registers_per_request)
            cap_bits = min(MAX_BITS, self.max_bits_per_request)
            located = False
            for index, tag in enumerate(self.tags):
                try:
                    plan_requests([tag], max_registers=cap_regs, max_bits=cap_bits)
                except ValueError as one:
                    located = True
                    key = "length" if tag.type == "string" else "type"
                    out.append(
                        (
                            ("tags", index, key),
                            f"{one}: raise the device's max_registers_per_request to at least "
                            f"{tag.register_count()}",
                        )
                    )
            if not located:
                out.append(((), str(exc)))
        return out

    def _simulate_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Simulated values the simulator cannot produce for their tag (simulator mode)."""
        from drivers.generators import Kind, make_generator

        out: list[tuple[tuple[str | int, ...], str]] = []
        for index, tag in enumerate(self.tags):
            if tag.simulate is None:
                continue
            kind: Kind
            if tag.type == "string":
                kind = "str"
            elif tag.type in ("bool", "bit"):
                kind = "bool"
            elif tag.type in ("float32", "float64") or tag.scale != 1 or tag.offset % 1:
                kind = "float"
            else:
                kind = "int"
            try:
                make_generator(tag.simulate, kind)
            except ValueError as exc:
                out.append((("tags", index, "simulate"), str(exc)))
        return out

    def write_refusal(self, tag: str) -> str | None:
        """Coils and holding registers can be written (function 5/6/15/16/22); discrete
        inputs and input registers are read-only in the Modbus data model."""
        found = next((t for t in self.tags if t.name == tag), None)
        if found is None:
            return f"no tag {tag!r} on device {self.name!r}"
        table = found.resolved_table()
        if table in ("discrete_input", "input"):
            kind = "a discrete input" if table == "discrete_input" else "an input register"
            return f"{kind} is read-only in Modbus (only coils and holding registers are written)"
        return None

    @field_validator("host")
    @classmethod
    def _reached(cls, host: str | None, info: ValidationInfo) -> str | None:
        if "link" not in info.data:
            return host  # the link is invalid: reported there
        link = info.data["link"]
        if link is None and host is None:
            raise ValueError("`host` is required (or `link` for a unit on a shared link)")
        if link is not None and host is not None:
            raise ValueError(f"`host` and `link` exclude each other (link {link!r})")
        return host

    @model_validator(mode="after")
    def _transport(self) -> ModbusDevice:
        if self.link is None and self.transport not in (None, "tcp"):
            raise ValueError(f"transport {self.transport} needs a `link`")
        return self

    @property
    def endpoint(self) -> str:
        """`host:port`, or `link NAME` for a unit on a shared link."""
        return f"link {self.link}" if self.link is not None else f"{self.host}:{self.port}"
