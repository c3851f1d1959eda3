"""Simulated MELSEC CPUs speaking SLMP binary (3E and 4E) over TCP or UDP, serving the config.

Our own asyncio server, so that simulator mode needs no extra package and serves exactly
the configured devices; the independent check is aslmp's client reading it and our driver
reading aslmp's testing server (tests/integration/test_melsec_crosscheck.py):

- Commands: batch read 0401 in word units (0000; bit devices read 16 points per word) and
  bit units (0001), random read 0403 (0000), batch write 1401 in word units (0000; bit
  devices take 16 points per word) and bit units (0001). Anything else gets end code
  0xC059 (not supported). A write is stored as sent, and every tag it touches stops
  following its generator: the next read returns the written value, so a commissioning
  can be rehearsed. Like a CPU (and aslmp's testing server), the simulator accepts writes
  to every family it has; the families the driver refuses to write are its own policy.
- Device memory: every device family of the series, with the CPU's default number of
  points (`RANGES`); numbers the config does not use read 0, as on a real CPU. A read past
  the end gets 0xC056, a family the series lacks (ZR on iQ-F) or a bit-units read of a
  word device 0xC05C, too many points 0xC051 / 0xC052 / 0xC054, a data length that does
  not match 0xC061: a typo shows as a bad quality with the CPU's own end code.
- Each answer echoes the request's route and, on 4E, its serial number. Devices on the same
  host:port with different routes (network, station, module I/O, multidrop) share one
  server; a request for a route nobody serves gets 0x4A01 (not in the routing parameters).
- Values come from `drivers.generators` in engineering units, turned back into raw values
  (raw = (value - offset) / scale, rounded and clamped for integers) and stored with our
  codec, refreshed lazily when a request arrives at most every `update_interval_s`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

import structlog

from drivers.base import Scalar
from drivers.generators import Generator, Kind, default_spec, make_generator
from drivers.melsec.codec import (
    CMD_BATCH_READ,
    CMD_BATCH_WRITE,
    CMD_RANDOM_READ,
    SUB_BIT,
    SUB_WORD,
    Route,
    decode_bit_points,
    encode_bit_points,
    encode_value,
)
from drivers.melsec.config import (
    ABSENT,
    DEVICE_KINDS,
    KIND_BY_CODE,
    MAX_BITS,
    MAX_RANDOM_POINTS,
    MAX_WORDS,
    Address,
    MelsecDevice,
    MelsecTag,
    Series,
)

__all__ = ["RANGES", "MelsecSimulator"]

log = structlog.get_logger(__name__)

#: Points of each device family per series: the CPU's default device settings (iQ-F:
#: FX5U; Q/L/iQ-R: the default parameters of a mid-size CPU).
_Q_RANGES = {
    "SM": 2048, "SD": 2048, "X": 0x2000, "Y": 0x2000, "M": 8192, "L": 8192, "F": 2048,
    "B": 0x2000, "SB": 0x800, "D": 12288, "W": 0x2000, "SW": 0x800, "TS": 2048, "TN": 2048,
    "CS": 1024, "CN": 1024, "R": 32768, "ZR": 0x10000,
}  # fmt: skip
RANGES: dict[Series, dict[str, int]] = {
    "q": _Q_RANGES,
    "l": _Q_RANGES,
    "iq-r": {**_Q_RANGES, "D": 18432, "ZR": 0x40000},
    "iq-f": {
        "SM": 10000, "SD": 12000, "X": 1024, "Y": 1024, "M": 32768, "L": 32768, "F": 32768,
        "B": 32768, "SB": 32768, "D": 8000, "W": 32768, "SW": 32768, "TS": 1024, "TN": 1024,
        "CS": 1024, "CN": 1024, "R": 32768,
    },
}  # fmt: skip

_INT_RANGE = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38


def _loopback(host: str) -> str:
    try:
        return host if ipaddress.ip_address(host).is_loopback else "127.0.0.1"
    except ValueError:
        return "127.0.0.1"


def _raw_converter(
    tag: MelsecTag,
) -> tuple[Kind, float | None, float | None, Callable[[Scalar], Scalar]]:
    t = tag.resolved_type()
    if t == "bool":
        return "bool", None, None, bool
    if t == "string":
        size = 2 * tag.word_count()
        return "str", None, None, lambda v: str(v).encode("ascii", "replace").decode()[:size]
    scale, offset = tag.scale, tag.offset
    if t.startswith("float"):
        cap = _FLOAT32_MAX if t == "float32" else math.inf

        def to_float(value: Scalar) -> Scalar:
            raw = (float(value) - offset) / scale if scale else float(value)
            return min(max(raw, -cap), cap)

        return "float", None, None, to_float
    rmin, rmax = _INT_RANGE[t]
    ends = (rmin * scale + offset, rmax * scale + offset)
    kind: Kind = "int" if scale == 1 and float(offset).is_integer() else "float"

    def to_int(value: Scalar) -> Scalar:
        if kind == "int" and isinstance(value, int) and offset == 0:
            return min(max(value, rmin), rmax)
        raw = (float(value) - offset) / scale if scale else float(value)
        if math.isnan(raw):
            return 0
        return min(max(round(min(max(raw, float(rmin)), float(rmax))), rmin), rmax)

    return kind, min(ends), max(ends), to_int


@dataclass(slots=True)
class _SimTag:
    tag: MelsecTag
    address: Address
    data_type: str
    words: int
    generator: Generator
    to_raw: Callable[[Scalar], Scalar]


@dataclass(slots=True)
class _Cpu:
    """One simulated CPU: its device memory and the tags that drive it."""

    device: MelsecDevice
    tags: list[_SimTag]
    words: dict[int, bytearray]  # device code → 2 bytes per word
    bits: dict[int, bytearray]  # device code → 1 byte per point
    refreshed: float = -math.inf
    requests: int = 0
    writes: int = 0
    # (device code, number) of every word or point a client wrote: the tags there keep it.
    held: set[tuple[int, int]] = field(default_factory=set)

    @classmethod
    def build(cls, device: MelsecDevice, seed: int) -> _Cpu:
        words: dict[int, bytearray] = {}
        bits: dict[int, bytearray] = {}
        for name, points in RANGES[device.series].items():
            if name in ABSENT[device.series]:
                continue
            kind = DEVICE_KINDS[name]
            (bits if kind.is_bit else words)[kind.code] = bytearray(
                points if kind.is_bit else 2 * points
            )
        tags = []
        for number, tag in enumerate(device.tags):
            addr = device.address_of(tag)
            kind_, lo, hi, to_raw = _raw_converter(tag)
            spec = tag.simulate or default_spec(kind_, lo, hi)
            gen = make_generator(spec, kind_, lo=lo, hi=hi, seed=seed + number)
            tags.append(_SimTag(tag, addr, tag.resolved_type(), tag.word_count(), gen, to_raw))
        return cls(device, tags, words, bits)

    def _is_held(self, sim: _SimTag) -> bool:
        code, number = sim.address.kind.code, sim.address.number
        size = 1 if sim.address.kind.is_bit else sim.words
        return any((code, n) in self.held for n in range(number, number + size))

    def refresh(self, t: float) -> None:
        for sim in self.tags:
            if self.held and self._is_held(sim):
                continue
            code = sim.address.kind.code
            try:
                raw = sim.to_raw(sim.generator(t))
                if sim.address.kind.is_bit:
                    store = self.bits.get(code)
                    if store is not None and sim.address.number < len(store):
                        store[sim.address.number] = 1 if raw else 0
                    continue
                store = self.words.get(code)
                at = 2 * sim.address.number
                if store is None or at + 2 * sim.words > len(store):
                    continue  # outside the CPU's memory: reads of it get an end code
                if sim.address.bit is not None:
                    word = store[at] | store[at + 1] << 8
                    mask = 1 << sim.address.bit
                    word = word | mask if raw else word & ~mask
                    store[at : at + 2] = word.to_bytes(2, "little")
                else:
                    store[at : at + 2 * sim.words] = encode_value(sim.data_type, raw, sim.words)
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                log.debug("melsec.simulator.encode_failed", tag=sim.tag.name, error=str(exc))

    # ---------------------------------------------------------------- reads

    def read_words(self, code: int, number: int, count: int) -> tuple[int, bytes]:
        """(end code, data) of `count` words from `number` (bit devices: 16 points each)."""
        if code in self.words:
            store = self.words[code]
            if number + count > len(store) // 2:
                return 0xC056, b""
            return 0, bytes(store[2 * number : 2 * (number + count)])
        if code in self.bits:
            store = self.bits[code]
            if number + 16 * count > len(store):
                return 0xC056, b""
            out = bytearray()
            for w in range(count):
                base = number + 16 * w
                value = 0
                for i, b in enumerate(store[base : base + 16]):
                    value |= b << i
                out += value.to_bytes(2, "little")
            return 0, bytes(out)
        return 0xC05C, b""

    def write_words(self, code: int, number: int, count: int, data: bytes) -> int:
        """Store `count` words from `number` (bit devices: 16 points each); end code."""
        if code in self.words:
            store = self.words[code]
            if number + count > len(store) // 2:
                return 0xC056
            store[2 * number : 2 * (number + count)] = data
            self.held.update((code, n) for n in range(number, number + count))
            return 0
        if code in self.bits:
            store = self.bits[code]
            if number + 16 * count > len(store):
                return 0xC056
            for w in range(count):
                value = int.from_bytes(data[2 * w : 2 * w + 2], "little")
                for i in range(16):
                    store[number + 16 * w + i] = (value >> i) & 1
            self.held.update((code, n) for n in range(number, number + 16 * count))
            return 0
        return 0xC05C

    def write_bits(self, code: int, number: int, bits: Sequence[bool]) -> int:
        if code not in self.bits:
            return 0xC05C
        store = self.bits[code]
        if number + len(bits) > len(store):
            return 0xC056
        for i, bit in enumerate(bits):
            store[number + i] = 1 if bit else 0
        self.held.update((code, n) for n in range(number, number + len(bits)))
        return 0

    def read_bits(self, code: int, number: int, count: int) -> tuple[int, bytes]:
        if code not in self.bits:
            return 0xC05C, b""
        store = self.bits[code]
        if number + count > len(store):
            return 0xC056, b""
        return 0, encode_bit_points([bool(b) for b in store[number : number + count]])


@dataclass(slots=True)
class _Server:
    host: str
    port: int
    cpus: dict[Route, _Cpu]
    server: asyncio.Server | None = None
    udp: asyncio.DatagramTransport | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)


def _route_of(device: MelsecDevice) -> Route:
    return Route(device.network, device.station, device.module_io, device.multidrop_station)


class MelsecSimulator:
    """Serves simulated MELSEC CPUs for `devices` (async context manager).

    `endpoints[device.name]` is the (host, port) a device listens on, once started;
    `request_count(name)` counts the requests a device received.
    """

    def __init__(
        self, devices: Sequence[MelsecDevice], *, update_interval_s: float = 0.1, seed: int = 0
    ) -> None:
        self.update_interval_s = update_interval_s
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._cpus: dict[str, _Cpu] = {}
        self._servers: list[_Server] = []
        self._t0 = 0.0
        self._started = False
        by_endpoint: dict[tuple[str, int], _Server] = {}
        for number, device in enumerate(devices):
            if device.name in self._cpus:
                raise ValueError(f"device {device.name!r} is configured twice")
            cpu = _Cpu.build(device, seed + 1000 * number)
            self._cpus[device.name] = cpu
            host, route = _loopback(device.host), _route_of(device)
            if device.port == 0:
                self._servers.append(_Server(host, 0, {route: cpu}))
                continue
            server = by_endpoint.get((host, device.port))
            if server is None:
                server = by_endpoint[(host, device.port)] = _Server(host, device.port, {})
                self._servers.append(server)
            if route in server.cpus:
                other = server.cpus[route].device.name
                raise ValueError(
                    f"devices {other!r} and {device.name!r} both use {host}:{device.port} "
                    f"network {device.network} station {device.station}"
                )
            server.cpus[route] = cpu

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
            udp, entry.udp = entry.udp, None
            if udp is not None:
                udp.close()
            if server is not None:
                server.close()
            for writer in list(entry.writers):
                writer.transport.abort()
            if entry.handlers:
                # Aborted connections end their handlers; wait so none is left to be
                # cancelled by the loop's shutdown.
                await asyncio.wait(list(entry.handlers), timeout=2.0)
            if server is not None:
                await server.wait_closed()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.stop()

    async def __aenter__(self) -> MelsecSimulator:
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
        return self._cpus[device_name].requests

    def write_count(self, device_name: str) -> int:
        """Batch writes the simulated CPU accepted since start."""
        return self._cpus[device_name].writes

    def cpu(self, device_name: str) -> _Cpu:
        """The simulated CPU of a device (tests read its memory)."""
        return self._cpus[device_name]

    # ---------------------------------------------------------------- internals

    async def _start_server(self, entry: _Server) -> None:
        transports = {cpu.device.transport for cpu in entry.cpus.values()}
        # The configured port, else free ones; three tries, since with TCP and UDP on one
        # number the UDP port of a free TCP port may be taken.
        ports = ([entry.port] if entry.port else []) + [0, 0, 0]
        for attempt, port in enumerate(ports):
            try:
                if "tcp" in transports:
                    server = await asyncio.start_server(
                        lambda r, w: self._serve(entry, r, w), entry.host, port
                    )
                    entry.server = server
                    port = int(server.sockets[0].getsockname()[1])
                if "udp" in transports:
                    udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                        lambda: _Datagrams(self, entry), local_addr=(entry.host, port)
                    )
                    entry.udp = udp
                    port = int(udp.get_extra_info("sockname")[1])
            except OSError:
                if entry.server is not None:
                    entry.server.close()
                    entry.server = None
                if attempt == len(ports) - 1:
                    raise
                if attempt == 0 and entry.port:
                    log.warning(
                        "melsec.simulator.port_busy",
                        endpoint=f"{entry.host}:{entry.port}",
                        fallback="free",
                    )
                continue
            entry.port = port
            break
        for cpu in entry.cpus.values():
            self.endpoints[cpu.device.name] = (entry.host, entry.port)
            log.info(
                "melsec.simulator.started",
                device=cpu.device.name,
                endpoint=f"{entry.host}:{entry.port}",
                transport=cpu.device.transport,
                series=cpu.device.series,
                tags=len(cpu.device.tags),
            )

    def answer_datagram(self, entry: _Server, data: bytes) -> bytes | None:
        """The answer to one request datagram, or None (not SLMP binary: silence)."""
        if data[:2] == b"\x50\x00":
            prefix, head_at = b"\xd0\x00", 2
        elif data[:2] == b"\x54\x00" and len(data) >= 6:
            prefix, head_at = b"\xd4\x00" + data[2:6], 6
        else:
            return None
        if len(data) < head_at + 7:
            return None
        net, pc, io, drop, length = struct.unpack_from("<BBHBH", data, head_at)
        body = data[head_at + 7 :]
        if length < 6 or len(body) != length:
            return None
        route = Route(net, pc, io, drop)
        answer = self._answer(entry, route, body)
        return prefix + route.pack() + struct.pack("<H", len(answer)) + answer

    async def _serve(
        self, entry: _Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        entry.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            entry.handlers.add(task)
        try:
            while True:
                sub = await reader.readexactly(2)
                if sub == b"\x50\x00":
                    head = await reader.readexactly(7)
                    prefix, serial = sub, b""
                elif sub == b"\x54\x00":
                    extra = await reader.readexactly(4)
                    head = await reader.readexactly(7)
                    prefix, serial = b"\xd4\x00" + extra, extra
                else:
                    return  # not SLMP binary: a CPU stays silent; drop the connection
                net, pc, io, drop, length = struct.unpack("<BBHBH", head)
                if length < 6 or length > 8192:
                    return
                body = await reader.readexactly(length)
                route = Route(net, pc, io, drop)
                answer = self._answer(entry, route, body)
                out_prefix = b"\xd0\x00" if not serial else prefix
                writer.write(out_prefix + route.pack() + struct.pack("<H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            entry.writers.discard(writer)
            if task is not None:
                entry.handlers.discard(task)
            writer.close()

    def _answer(self, entry: _Server, route: Route, body: bytes) -> bytes:
        """End code + data (or end code + error information) for one request."""
        command, sub = struct.unpack_from("<HH", body, 2)
        data = body[6:]

        def error(code: int) -> bytes:
            return struct.pack("<H", code) + route.pack() + struct.pack("<HH", command, sub)

        cpu = entry.cpus.get(route)
        if cpu is None:
            return error(0x4A01)
        cpu.requests += 1
        now = asyncio.get_running_loop().time()
        if now - cpu.refreshed >= self.update_interval_s:
            cpu.refreshed = now
            cpu.refresh(now - self._t0)
        series = cpu.device.series
        if command == CMD_BATCH_READ and sub in (SUB_WORD, SUB_BIT):
            if len(data) != 6:
                return error(0xC061)
            number = int.from_bytes(data[0:3], "little")
            code = data[3]
            (count,) = struct.unpack_from("<H", data, 4)
            if code not in KIND_BY_CODE:
                return error(0xC05C)
            if sub == SUB_BIT:
                if count == 0 or count > MAX_BITS[series]:
                    return error(0xC051)
                end, out = cpu.read_bits(code, number, count)
            else:
                if count == 0 or count > MAX_WORDS:
                    return error(0xC052)
                end, out = cpu.read_words(code, number, count)
            return struct.pack("<H", 0) + out if end == 0 else error(end)
        if command == CMD_BATCH_WRITE and sub in (SUB_WORD, SUB_BIT):
            if len(data) < 6:
                return error(0xC061)
            number = int.from_bytes(data[0:3], "little")
            code = data[3]
            (count,) = struct.unpack_from("<H", data, 4)
            points = data[6:]
            if code not in KIND_BY_CODE:
                return error(0xC05C)
            if sub == SUB_BIT:
                if count == 0 or count > MAX_BITS[series]:
                    return error(0xC051)
                if len(points) != (count + 1) // 2:
                    return error(0xC061)
                end = cpu.write_bits(code, number, decode_bit_points(points, count))
            else:
                if count == 0 or count > MAX_WORDS:
                    return error(0xC052)
                if len(points) != 2 * count:
                    return error(0xC061)
                end = cpu.write_words(code, number, count, points)
            if end:
                return error(end)
            cpu.writes += 1
            return struct.pack("<H", 0)
        if command == CMD_RANDOM_READ and sub == SUB_WORD:
            if len(data) < 2:
                return error(0xC061)
            n_words, n_dwords = data[0], data[1]
            if n_words + n_dwords == 0 or n_words + n_dwords > MAX_RANDOM_POINTS:
                return error(0xC054)
            if len(data) != 2 + 4 * (n_words + n_dwords):
                return error(0xC061)
            values = bytearray()
            for i in range(n_words + n_dwords):
                at = 2 + 4 * i
                number = int.from_bytes(data[at : at + 3], "little")
                code = data[at + 3]
                if code not in KIND_BY_CODE:
                    return error(0xC05C)
                end, value = cpu.read_words(code, number, 1 if i < n_words else 2)
                if end:
                    return error(end)
                values += value
            return struct.pack("<H", 0) + bytes(values)
        return error(0xC059)


class _Datagrams(asyncio.DatagramProtocol):
    """The UDP side of a simulated server: one request datagram, one answer datagram."""

    def __init__(self, simulator: MelsecSimulator, entry: _Server) -> None:
        self.simulator = simulator
        self.entry = entry
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        answer = self.simulator.answer_datagram(self.entry, data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)
