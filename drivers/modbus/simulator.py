"""Simulated Modbus/TCP devices serving exactly the tags of their config.

Built on pymodbus' async TCP server and its `SimDevice`/`SimData` datastore (the older
`ModbusSequentialDataBlock` context is deprecated in 3.16 and is 1-based internally).
Addressing convention, tested in tests/integration/test_modbus_driver.py: `SimData.address`
is the 0-based protocol address, the same number as `ModbusTag.resolved_address()` and as
the address on the wire; register "40001" is holding address 0.

- Only configured addresses answer. A request touching any unconfigured register or bit
  gets exception 2 (illegal data address), so a typo in a config shows as a bad quality,
  not as a zero. The same holds for writes: a write touching an unconfigured address
  gets exception 2.
- Writes (function 5, 6, 15, 16 and 22 on coils and holding registers; the other two
  tables cannot be addressed by a Modbus write) are stored as sent, and every tag they
  touch stops following its generator: the next read returns the written value, so a
  commissioning can be rehearsed against the simulator.
- Values come from `drivers.generators` in engineering units and are turned back into
  raw values (raw = (value - offset) / scale, rounded and clamped for integer types),
  then encoded with our own codec and the tag's byte order, so simulation and decoding
  agree.
- Values are refreshed lazily: when a request arrives and the table was last refreshed
  more than `update_interval_s` ago, every tag of that table is recomputed. Clients
  see values that change every `update_interval_s`; an idle simulator costs nothing.
- Devices configured on the same host:port with different unit ids share one server.
  A device whose port is 0 or busy gets a free port from the OS; `endpoints` tells where
  each device actually listens. Non-loopback hosts are served on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.base import Scalar
from drivers.generators import Generator, Kind, default_spec, make_generator
from drivers.modbus.codec import CodecError, ValueSpec, encode, type_range
from drivers.modbus.config import ModbusDevice, ModbusTag, Table

__all__ = ["LinkSimulator", "ModbusSimulator"]

log = structlog.get_logger(__name__)

_TABLES: tuple[Table, ...] = ("coil", "discrete_input", "holding", "input")
_READ_FC: dict[int, Table] = {1: "coil", 2: "discrete_input", 3: "holding", 4: "input"}
_WRITE_FC: dict[int, Table] = {5: "coil", 15: "coil", 6: "holding", 16: "holding", 22: "holding"}
_FLOAT32_MAX = 3.4028234663852886e38


def _loopback(host: str) -> str:
    try:
        return host if ipaddress.ip_address(host).is_loopback else "127.0.0.1"
    except ValueError:
        return "127.0.0.1"


@dataclass(slots=True)
class _SimTag:
    """One configured tag: where it lives and how its raw value is produced."""

    tag: ModbusTag
    table: Table
    address: int
    spec: ValueSpec
    generator: Generator
    to_raw: Callable[[Scalar], Scalar]


@dataclass(slots=True)
class _Unit:
    """One simulated device (unit id) on a server."""

    device: ModbusDevice
    tags: dict[Table, list[_SimTag]]
    masks: dict[Table, bytearray]
    refreshed: dict[Table, float] = field(default_factory=dict)
    requests: int = 0
    # Addresses written by a client: the tags there keep the written value.
    held: dict[Table, bytearray] = field(
        default_factory=lambda: {t: bytearray(65536) for t in ("coil", "holding")}
    )
    writes: int = 0

    def hold(self, table: Table, address: int, count: int) -> None:
        """Mark `count` addresses from `address` as written."""
        self.held[table][address : address + count] = b"\x01" * count
        self.writes += 1

    def is_held(self, sim: _SimTag) -> bool:
        held = self.held.get(sim.table)
        return (
            held is not None
            and held.find(1, sim.address, sim.address + sim.spec.register_count) != -1
        )


def _raw_converter(
    tag: ModbusTag,
) -> tuple[Kind, float | None, float | None, Callable[[Scalar], Scalar]]:
    """Generator kind, engineering range and engineering → raw conversion for `tag`."""
    t = tag.type
    if t in ("bool", "bit"):
        return "bool", None, None, bool
    if t == "string":
        size = 2 * tag.register_count()

        def to_text(value: Scalar) -> Scalar:
            text = str(value).encode("ascii", "replace").decode("ascii")
            return text[:size]

        return "str", None, None, to_text
    scale, offset = tag.scale, tag.offset
    limits = type_range(t)
    if limits is None:  # float32 / float64
        cap = _FLOAT32_MAX if t == "float32" else math.inf

        def to_float(value: Scalar) -> Scalar:
            raw = (float(value) - offset) / scale if scale else float(value)
            return min(max(raw, -cap), cap)

        return "float", None, None, to_float
    rmin, rmax = limits
    ends = (rmin * scale + offset, rmax * scale + offset)
    lo, hi = min(ends), max(ends)
    kind: Kind = "int" if scale == 1 and float(offset).is_integer() else "float"

    def to_int(value: Scalar) -> Scalar:
        raw = (float(value) - offset) / scale if scale else float(value)
        if math.isnan(raw):
            return 0
        raw = min(max(raw, float(rmin)), float(rmax))
        return min(max(round(raw), rmin), rmax)

    return kind, lo, hi, to_int


def _build_unit(device: ModbusDevice, seed: int) -> _Unit:
    tags: dict[Table, list[_SimTag]] = {t: [] for t in _TABLES}
    masks: dict[Table, bytearray] = {t: bytearray(65536) for t in _TABLES}
    for number, tag in enumerate(device.tags):
        table = tag.resolved_table()
        address = tag.resolved_address()
        kind, lo, hi, to_raw = _raw_converter(tag)
        spec = tag.simulate or default_spec(kind, lo, hi)
        generator = make_generator(spec, kind, lo=lo, hi=hi, seed=seed + number)
        tags[table].append(
            _SimTag(
                tag, table, address, ValueSpec.from_tag(tag, device.byte_order), generator, to_raw
            )
        )
        count = tag.register_count()
        masks[table][address : address + count] = b"\x01" * count
    return _Unit(device=device, tags=tags, masks=masks)


def _runs(mask: bytearray) -> list[tuple[int, int]]:
    """(start, count) of every run of configured addresses."""
    runs: list[tuple[int, int]] = []
    pos = mask.find(1)
    while pos != -1:
        end = mask.find(0, pos)
        if end == -1:
            end = len(mask)
        runs.append((pos, end - pos))
        pos = mask.find(1, end)
    return runs


def _simdata(unit: _Unit) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    blocks: list[list[SimData]] = []
    for table in _TABLES:
        runs = _runs(unit.masks[table])
        bits = table in ("coil", "discrete_input")
        if bits:
            entries = [SimData(a, values=[False] * n, datatype=DataType.BITS) for a, n in runs]
            # pymodbus needs at least one entry per table; our mask still refuses it.
            entries = entries or [SimData(0, values=[False], datatype=DataType.BITS)]
        else:
            entries = [SimData(a, values=[0] * n, datatype=DataType.REGISTERS) for a, n in runs]
            entries = entries or [SimData(0, datatype=DataType.INVALID)]
        blocks.append(entries)
    return blocks[0], blocks[1], blocks[2], blocks[3]


@dataclass(slots=True)
class _Server:
    host: str
    port: int
    units: dict[int, _Unit]
    server: ModbusTcpServer | None = None


class ModbusSimulator:
    """Serves simulated Modbus/TCP devices for `devices` (async context manager).

    `endpoints[device.name]` is the (host, port) the device actually listens on, known
    once started. `request_count(name)` counts requests received for a device (valid
    or not). `serve_forever()` runs until cancelled, for `edge-agent simulate`.
    """

    def __init__(
        self,
        devices: Sequence[ModbusDevice],
        *,
        update_interval_s: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.update_interval_s = update_interval_s
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._units: dict[str, _Unit] = {}
        self._servers: list[_Server] = []
        self._t0 = 0.0
        self._started = False
        by_endpoint: dict[tuple[str, int], _Server] = {}
        for number, device in enumerate(devices):
            if device.link is not None:
                continue  # a unit on a shared link: served by LinkSimulator
            if device.name in self._units:
                raise ValueError(f"device {device.name!r} is configured twice")
            unit = _build_unit(device, seed + 1000 * number)
            self._units[device.name] = unit
            host = _loopback(device.host or "127.0.0.1")
            if device.port == 0:
                self._servers.append(_Server(host, 0, {device.unit_id: unit}))
                continue
            server = by_endpoint.get((host, device.port))
            if server is None:
                server = by_endpoint[(host, device.port)] = _Server(host, device.port, {})
                self._servers.append(server)
            if device.unit_id in server.units:
                other = server.units[device.unit_id].device.name
                raise ValueError(
                    f"devices {other!r} and {device.name!r} both use "
                    f"{host}:{device.port} unit {device.unit_id}"
                )
            server.units[device.unit_id] = unit

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every server; afterwards `endpoints` is complete."""
        if self._started:
            return
        self._t0 = asyncio.get_running_loop().time()
        self._started = True
        try:
            for entry in self._servers:
                await self._start_server(entry)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every server and drop its client connections."""
        self._started = False
        for entry in self._servers:
            server, entry.server = entry.server, None
            if server is not None:
                await server.shutdown()  # type: ignore[no-untyped-call]

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled, then stop."""
        await self.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.stop()

    async def __aenter__(self) -> ModbusSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def request_count(self, device_name: str) -> int:
        """Requests received for `device_name` since start (including refused ones)."""
        return self._units[device_name].requests

    def write_count(self, device_name: str) -> int:
        """Writes the simulator accepted for `device_name` since start."""
        return self._units[device_name].writes

    # ------------------------------------------------------------------ internals

    async def _start_server(self, entry: _Server) -> None:
        ports = [entry.port] if entry.port == 0 else [entry.port, 0]
        for port in ports:
            server = self._make_server(entry, port)
            try:
                await server.serve_forever(background=True)
            except RuntimeError:  # pymodbus' way of saying "could not listen"
                if port == 0:
                    raise
                log.warning(
                    "modbus.simulator.port_busy", endpoint=f"{entry.host}:{port}", fallback="free"
                )
                continue
            sockets = cast(asyncio.Server, server.transport).sockets  # listening: a Server
            entry.server = server
            entry.port = int(sockets[0].getsockname()[1])
            break
        for unit in entry.units.values():
            self.endpoints[unit.device.name] = (entry.host, entry.port)
            log.info(
                "modbus.simulator.started",
                device=unit.device.name,
                endpoint=f"{entry.host}:{entry.port}",
                unit_id=unit.device.unit_id,
                tags=len(unit.device.tags),
            )

    def _make_server(self, entry: _Server, port: int) -> ModbusTcpServer:
        devices = [
            SimDevice(unit_id, simdata=_simdata(unit), action=self._make_action(unit))
            for unit_id, unit in entry.units.items()
        ]
        units = entry.units

        def count_request(sending: bool, pdu: Any) -> Any:
            if not sending:
                unit = units.get(pdu.dev_id) or units.get(0)
                if unit is not None:
                    unit.requests += 1
            return pdu

        return ModbusTcpServer(devices, address=(entry.host, port), trace_pdu=count_request)

    def _make_action(self, unit: _Unit) -> Any:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if set_values is not None:
                table = _WRITE_FC.get(function_code)
                if table is None:
                    return ExcCodes.ILLEGAL_FUNCTION
                # pymodbus passes a coil block's register count: the written bits count.
                count = len(set_values)
            else:
                table = _READ_FC.get(function_code) or _WRITE_FC.get(function_code)
                if table is None:
                    return ExcCodes.ILLEGAL_FUNCTION
            if unit.masks[table].find(0, address, address + count) != -1:
                return ExcCodes.ILLEGAL_ADDRESS
            now = asyncio.get_running_loop().time()
            if now - unit.refreshed.get(table, -math.inf) >= self.update_interval_s:
                unit.refreshed[table] = now
                self._refresh(unit, table, registers, start_address, now - self._t0)
            if set_values is not None:
                unit.hold(table, address, count)
            return None

        return action

    @staticmethod
    def _refresh(unit: _Unit, table: Table, registers: list[int], base: int, t: float) -> None:
        """Recompute every tag of `table` into pymodbus' register list (in place)."""
        if table in ("coil", "discrete_input"):
            # pymodbus packs 16 bits per register, bit 0 of the register = lowest address;
            # `base` is the register index of the block's first 16 bits.
            for sim in unit.tags[table]:
                if unit.is_held(sim):
                    continue
                index, bit = divmod(sim.address, 16)
                index -= base
                if sim.to_raw(sim.generator(t)):
                    registers[index] |= 1 << bit
                else:
                    registers[index] &= ~(1 << bit)
            return
        for sim in unit.tags[table]:
            if unit.is_held(sim):
                continue
            try:
                words = encode(sim.spec, sim.to_raw(sim.generator(t)))
            except (CodecError, ValueError, TypeError, OverflowError) as exc:
                log.debug("modbus.simulator.encode_failed", tag=sim.tag.name, error=str(exc))
                continue
            index = sim.address - base
            if sim.spec.data_type == "bit":
                mask = 1 << (sim.spec.bit or 0)
                registers[index] = (registers[index] & ~mask) | words[0]
            else:
                registers[index : index + len(words)] = words


# ------------------------------------------------------------------ serial links
#
# Units on a shared link (`link:` devices) are served by `LinkSimulator`: our own RTU
# slave (framing from drivers/modbus/rtu.py, the same datastore and generators as the
# TCP simulator above) on a pty pair for a `serial` link, or on a TCP port for an
# `rtu_over_tcp` link (a simulated serial device server); a `tcp` gateway link is
# served by a ModbusSimulator holding all its units. Unlike pymodbus' serial server,
# a unit id nobody serves stays silent, as on a real RS-485 line.


_REQUEST_FIXED = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 22: 10}


class _RtuUnits:
    """The RTU slaves of one line: parses requests, answers with the line's timing."""

    def __init__(
        self,
        name: str,
        units: dict[int, _Unit],
        timing: Any,
        sim: LinkSimulator,
    ) -> None:
        self.name = name
        self.units = units
        self.timing = timing
        self.sim = sim
        self.rx = bytearray()
        self.regs: dict[tuple[int, Table], list[int]] = {}
        for unit_id in units:
            for table in _TABLES:
                size = 4096 if table in ("coil", "discrete_input") else 65536
                self.regs[(unit_id, table)] = [0] * size
        self.answers = 0
        self._busy: asyncio.Lock = asyncio.Lock()

    def frames(self, data: bytes) -> list[bytes]:
        """Split received bytes into request frames; drop what cannot be one."""
        from drivers.modbus.rtu import crc16

        self.rx += data
        out: list[bytes] = []
        while len(self.rx) >= 2:
            fc = self.rx[1]
            size = _REQUEST_FIXED.get(fc)
            if size is None and fc in (15, 16):
                if len(self.rx) < 7:
                    break
                size = 9 + self.rx[6]
            if size is None:
                self.rx.clear()
                break
            if len(self.rx) < size:
                break
            frame = bytes(self.rx[:size])
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                self.rx.clear()  # a slave ignores a corrupted frame
                break
            del self.rx[:size]
            out.append(frame)
        return out

    def answer(self, frame: bytes) -> bytes | None:
        """The answer to one request frame, or None (silence)."""
        from drivers.modbus.rtu import encode_answer

        unit_id, fc = frame[0], frame[1]
        unit = self.units.get(unit_id)
        if unit is None or unit_id in self.sim.silent_units.get(self.name, ()):
            return None
        unit.requests += 1
        if fc in _WRITE_FC:
            return self._write(unit_id, unit, frame)
        table = _READ_FC.get(fc)
        if table is None:
            return encode_answer(frame[:2], None, exception=1)
        start = int.from_bytes(frame[2:4], "big")
        count = int.from_bytes(frame[4:6], "big")
        limit = 2000 if table in ("coil", "discrete_input") else 125
        if not 1 <= count <= limit:
            return encode_answer(frame, None, exception=3)
        if start + count > 65536 or unit.masks[table].find(0, start, start + count) != -1:
            return encode_answer(frame, None, exception=2)
        regs = self.regs[(unit_id, table)]
        now = asyncio.get_running_loop().time()
        if now - unit.refreshed.get(table, -math.inf) >= self.sim.update_interval_s:
            unit.refreshed[table] = now
            ModbusSimulator._refresh(unit, table, regs, 0, now - self.sim.t0)
        if table in ("coil", "discrete_input"):
            values = [(regs[a // 16] >> (a % 16)) & 1 for a in range(start, start + count)]
        else:
            values = regs[start : start + count]
        return encode_answer(frame, values)

    def _write(self, unit_id: int, unit: _Unit, frame: bytes) -> bytes:
        """Apply a write request (5, 6, 15, 16, 22) and answer with its echo."""
        from drivers.modbus.rtu import encode_answer

        fc = frame[1]
        table = _WRITE_FC[fc]
        start = int.from_bytes(frame[2:4], "big")
        field_ = int.from_bytes(frame[4:6], "big")
        if fc == 5 and field_ not in (0x0000, 0xFF00):
            return encode_answer(frame, None, exception=3)
        if fc in (15, 16):
            count = field_
            limit = 1968 if fc == 15 else 123
            size = (count + 7) // 8 if fc == 15 else 2 * count
            if not 1 <= count <= limit or frame[6] != size:
                return encode_answer(frame, None, exception=3)
        else:
            count = 1
        if start + count > 65536 or unit.masks[table].find(0, start, start + count) != -1:
            return encode_answer(frame, None, exception=2)
        regs = self.regs[(unit_id, table)]
        # Bring the table up to date first: a partial write keeps its neighbours' values.
        now = asyncio.get_running_loop().time()
        if now - unit.refreshed.get(table, -math.inf) >= self.sim.update_interval_s:
            unit.refreshed[table] = now
            ModbusSimulator._refresh(unit, table, regs, 0, now - self.sim.t0)
        if table == "coil":
            bits = (
                [field_ == 0xFF00]
                if fc == 5
                else [bool((frame[7 + i // 8] >> (i % 8)) & 1) for i in range(count)]
            )
            for i, bit in enumerate(bits):
                index, shift = divmod(start + i, 16)
                regs[index] = regs[index] | (1 << shift) if bit else regs[index] & ~(1 << shift)
        elif fc == 6:
            regs[start] = field_
        elif fc == 16:
            regs[start : start + count] = [
                int.from_bytes(frame[7 + 2 * i : 9 + 2 * i], "big") for i in range(count)
            ]
        else:  # 22: (current AND and_mask) OR (or_mask AND NOT and_mask)
            and_mask, or_mask = field_, int.from_bytes(frame[6:8], "big")
            regs[start] = (regs[start] & and_mask) | (or_mask & ~and_mask & 0xFFFF)
        unit.hold(table, start, count)
        return encode_answer(frame, None)

    def spoil(self, answer: bytes) -> bytes:
        """Line noise for tests: every `noise_every`-th answer is damaged, in turn by a
        flipped bit (CRC error), leading garbage, or a cut-off end."""
        self.answers += 1
        every = self.sim.noise_every
        if not every or self.answers % every:
            return answer
        kind = (self.answers // every) % 3
        self.sim.spoiled += 1
        if kind == 0:
            return answer[:3] + bytes((answer[3] ^ 0x10,)) + answer[4:]
        if kind == 1:
            return b"\xff\x00\x13" + answer
        return answer[: len(answer) // 2]

    async def serve(self, data: bytes, send: Callable[[bytes], None]) -> None:
        for frame in self.frames(data):
            reply = self.answer(frame)
            if reply is None:
                continue
            reply = self.spoil(reply)
            # The line's timing: the request on the wire, the silence that ends it, the
            # unit's reaction, then the answer on the wire.
            if self.timing is not None:
                delay = (
                    self.timing.wire_s(len(frame))
                    + self.timing.silence_s
                    + self.sim.reaction_s
                    + self.timing.wire_s(len(reply))
                )
                await asyncio.sleep(delay)
            send(reply)


class LinkSimulator:
    """Serves the units of every link in `links` that `devices` use (async context
    manager). Afterwards `links[name]` is the link config rewritten to reach its
    simulator: a `serial` link's port becomes the pty the simulator holds the other end
    of; `rtu_over_tcp` and `tcp` links get 127.0.0.1 and the port served.

    Test knobs: `silent_units[link] = {unit ids}` never answer; every `noise_every`-th
    answer on a serial line is damaged (see `_RtuUnits.spoil`); `reaction_s` is each
    unit's reaction time.
    """

    def __init__(
        self,
        links: dict[str, Any],
        devices: Sequence[ModbusDevice],
        *,
        update_interval_s: float = 0.1,
        seed: int = 0,
        reaction_s: float = 0.0005,
        silent_units: dict[str, set[int]] | None = None,
        noise_every: int = 0,
    ) -> None:
        from drivers.links import link_timing

        self.update_interval_s = update_interval_s
        self.reaction_s = reaction_s
        self.silent_units = silent_units or {}
        self.noise_every = noise_every
        self.spoiled = 0
        self.t0 = 0.0
        self.source = dict(links)
        self.links: dict[str, Any] = dict(links)
        self._lines: dict[str, _RtuUnits] = {}
        self._gateways: dict[str, list[ModbusDevice]] = {}
        self._units: dict[str, _Unit] = {}
        self._cleanup: list[Callable[[], Any]] = []
        self._tcp_sims: list[ModbusSimulator] = []
        by_link: dict[str, dict[int, _Unit]] = {}
        for number, device in enumerate(devices):
            if device.link is None or not device.enabled:
                continue
            if device.link not in links:
                raise ValueError(f"device {device.name!r}: link {device.link!r} is not defined")
            cfg = links[device.link]
            if cfg.type == "tcp":
                self._gateways.setdefault(device.link, []).append(device)
                continue
            units = by_link.setdefault(device.link, {})
            if device.unit_id in units:
                raise ValueError(
                    f"devices {units[device.unit_id].device.name!r} and {device.name!r} "
                    f"both use link {device.link} unit {device.unit_id}"
                )
            unit = _build_unit(device, seed + 1000 * number)
            units[device.unit_id] = unit
            self._units[device.name] = unit
        for name, units in by_link.items():
            self._lines[name] = _RtuUnits(name, units, link_timing(links[name]), self)

    def request_count(self, device_name: str) -> int:
        """Requests a unit on a serial link received (answered or refused)."""
        return self._units[device_name].requests

    async def start(self) -> None:
        """Open the ptys and servers; afterwards `links` is complete."""
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        try:
            for name, line in self._lines.items():
                cfg = self.source[name]
                if cfg.type == "serial":
                    update: dict[str, Any] = {"port": self._open_pty(line)}
                    if cfg.parity != "N":
                        # Linux ptys refuse PARENB once set (EINVAL from the second
                        # tcsetattr): serve 8E1/8O1 as 8N2, the same 11 bits per character.
                        update.update(parity="N", stop_bits=2)
                    self.links[name] = cfg.model_copy(update=update)
                else:
                    port = await self._open_tcp(line, _loopback(cfg.host), cfg.port)
                    self.links[name] = cfg.model_copy(
                        update={"host": _loopback(cfg.host), "port": port}
                    )
                log.info("modbus.simulator.link", link=name, where=str(self.links[name]))
            for name, members in self._gateways.items():
                cfg = self.source[name]
                host = _loopback(cfg.host)
                port = cfg.port or _free_port(host)
                copies = [
                    d.model_copy(update={"link": None, "host": host, "port": port}) for d in members
                ]
                sim = ModbusSimulator(copies, update_interval_s=self.update_interval_s)
                await sim.start()
                self._tcp_sims.append(sim)
                served = sim.endpoints[copies[0].name]
                # pymodbus 3.16's TCP server answers only the first of several requests
                # that arrive in one TCP segment: the simulated gateway takes one at a time.
                self.links[name] = cfg.model_copy(
                    update={"host": served[0], "port": served[1], "max_transactions": 1}
                )
        except BaseException:
            await self.stop()
            raise

    def _open_pty(self, line: _RtuUnits) -> str:
        import tty

        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        path = os.ttyname(slave)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def send(data: bytes) -> None:
            with contextlib.suppress(OSError):
                os.write(master, data)

        def readable() -> None:
            try:
                data = os.read(master, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EIO: no process has the other end open right now
                return
            task = loop.create_task(self._serve_locked(line, data, send))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_reader(master, readable)

        def cleanup() -> None:
            loop.remove_reader(master)
            for task in tasks:
                task.cancel()
            os.close(master)
            os.close(slave)

        self._cleanup.append(cleanup)
        return path

    @staticmethod
    async def _serve_locked(line: _RtuUnits, data: bytes, send: Callable[[bytes], None]) -> None:
        async with line._busy:  # one line: answers never overlap
            await line.serve(data, send)

    async def _open_tcp(self, line: _RtuUnits, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        sim = self

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.Transport, transport)
                self.tasks: set[asyncio.Task[None]] = set()

            def data_received(self, data: bytes) -> None:
                task = loop.create_task(sim._serve_locked(line, data, self.send))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

            def send(self, data: bytes) -> None:
                if not self.transport.is_closing():
                    self.transport.write(data)

            def connection_lost(self, exc: Exception | None) -> None:
                for task in self.tasks:
                    task.cancel()

        server = await loop.create_server(Proto, host, port)
        self._cleanup.append(server.close)
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close every pty and server."""
        for cleanup in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                cleanup()
        self._cleanup.clear()
        for sim in self._tcp_sims:
            await sim.stop()
        self._tcp_sims.clear()

    async def __aenter__(self) -> LinkSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
