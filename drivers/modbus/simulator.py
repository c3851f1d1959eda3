"""Simulated Modbus/TCP devices serving exactly the tags of their config.

Built on pymodbus' async TCP server and its `SimDevice`/`SimData` datastore (the older
`ModbusSequentialDataBlock` context is deprecated in 3.16 and is 1-based internally).
Addressing convention, tested in tests/integration/test_modbus_driver.py: `SimData.address`
is the 0-based protocol address, the same number as `ModbusTag.resolved_address()` and as
the address on the wire; register "40001" is holding address 0.

- Only configured addresses answer. A request touching any unconfigured register or bit
  gets exception 2 (illegal data address), so a typo in a config shows as a bad quality,
  not as a zero. Writes get exception 1 (illegal function): the simulator is read-only.
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
import ipaddress
import math
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

__all__ = ["ModbusSimulator"]

log = structlog.get_logger(__name__)

_TABLES: tuple[Table, ...] = ("coil", "discrete_input", "holding", "input")
_READ_FC: dict[int, Table] = {1: "coil", 2: "discrete_input", 3: "holding", 4: "input"}
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
            if device.name in self._units:
                raise ValueError(f"device {device.name!r} is configured twice")
            unit = _build_unit(device, seed + 1000 * number)
            self._units[device.name] = unit
            host = _loopback(device.host)
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
            table = _READ_FC.get(function_code)
            if table is None or set_values is not None:
                return ExcCodes.ILLEGAL_FUNCTION
            if unit.masks[table].find(0, address, address + count) != -1:
                return ExcCodes.ILLEGAL_ADDRESS
            now = asyncio.get_running_loop().time()
            if now - unit.refreshed.get(table, -math.inf) >= self.update_interval_s:
                unit.refreshed[table] = now
                self._refresh(unit, table, registers, start_address, now - self._t0)
            return None

        return action

    @staticmethod
    def _refresh(unit: _Unit, table: Table, registers: list[int], base: int, t: float) -> None:
        """Recompute every tag of `table` into pymodbus' register list (in place)."""
        if table in ("coil", "discrete_input"):
            # pymodbus packs 16 bits per register, bit 0 of the register = lowest address;
            # `base` is the register index of the block's first 16 bits.
            for sim in unit.tags[table]:
                index, bit = divmod(sim.address, 16)
                index -= base
                if sim.to_raw(sim.generator(t)):
                    registers[index] |= 1 << bit
                else:
                    registers[index] &= ~(1 << bit)
            return
        for sim in unit.tags[table]:
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
