"""Simulated S7 CPUs serving exactly the tags of their config (asyncio, our own codec).

- One server per device, on loopback; a port of 0 or a busy port gets a free one from the
  OS (`endpoints` tells where each device listens).
- The COTP connection request must name the device's remote TSAP (rack/slot or
  `remote_tsap`): another one is refused with a disconnect, as a CPU does.
- Setup communication grants min(asked, the device's `pdu_size`), or `grant_pdu`.
- Memory: one byte array per DB and per M/I/Q area, as long as its last configured tag
  needs. An item past the end is refused with 0x05 (address out of range), a DB the
  config does not use with 0x0A (object does not exist). A request or answer larger than
  the PDU gets header error 0x8500. Bit reads (transport size BIT) answer the bit alone,
  as a CPU does.
- Writes (write variable, transport size BIT or BYTE/WORD/DWORD) are stored as sent: a
  bit write changes that bit only, as a CPU does. Every tag a write touches stops
  following its generator, so the next read returns the written value and a
  commissioning can be rehearsed. An item past the end gets 0x05, an unknown DB 0x0A, a
  DB named in `write_protected_dbs` 0x03 (accessing the object not allowed: a DB the
  CPU protects from writes), a data item whose length does not match its specification
  0x07 (data type inconsistent); with `put_get=False` a write gets header error 0x8104.
- Values come from `drivers.generators` in engineering units, turned back into raw values
  (raw = (value - offset) / scale), encoded with our codec; refreshed lazily when a read
  arrives and the last refresh is older than `update_interval_s`.
- PLC-side settings can be imitated for tests: `put_get=False` answers every read with
  header error 0x8104 (as an S7-1200/1500 without PUT/GET); `optimized_dbs` answers
  items in those DBs with 0x05.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import structlog

from drivers.base import Scalar
from drivers.generators import Generator, Kind, default_spec, make_generator
from drivers.s7 import codec
from drivers.s7.codec import INT_RANGE, CodecError, ValueSpec, encode
from drivers.s7.config import AREA_CODE, S7Device, S7Tag
from drivers.s7.plan import spec_of

__all__ = ["S7Simulator"]

log = structlog.get_logger(__name__)

_CODE_AREA = {code: area for area, code in AREA_CODE.items()}
_TS_WIDTH = {0x01: 1, 0x02: 1, 0x03: 1, 0x04: 2, 0x05: 2, 0x06: 4, 0x07: 4, 0x08: 4}
_FLOAT32_MAX = 3.4028234663852886e38


def _loopback(host: str) -> str:
    try:
        return host if ipaddress.ip_address(host).is_loopback else "127.0.0.1"
    except ValueError:
        return "127.0.0.1"


def _raw_converter(
    tag: S7Tag,
) -> tuple[Kind, float | None, float | None, Callable[[Scalar], Scalar]]:
    t = tag.resolved_type()
    if t == "bool":
        return "bool", None, None, bool
    if t == "string":
        return "str", None, None, lambda v: str(v)
    if t == "date_and_time":
        return "str", None, None, lambda v: str(v)
    scale, offset = tag.scale, tag.offset
    if t in ("real", "lreal"):
        cap = _FLOAT32_MAX if t == "real" else math.inf

        def to_float(value: Scalar) -> Scalar:
            raw = (float(value) - offset) / scale if scale else float(value)
            return min(max(raw, -cap), cap)

        return "float", None, None, to_float
    rmin, rmax = INT_RANGE[t]
    ends = (rmin * scale + offset, rmax * scale + offset)
    kind: Kind = "int" if scale == 1 and float(offset).is_integer() else "float"

    def to_int(value: Scalar) -> Scalar:
        raw = (float(value) - offset) / scale if scale else float(value)
        if math.isnan(raw):
            return 0
        return min(max(round(min(max(raw, float(rmin)), float(rmax))), rmin), rmax)

    return kind, min(ends), max(ends), to_int


@dataclass(slots=True)
class _SimTag:
    tag: S7Tag
    key: tuple[str, int]
    byte: int
    spec: ValueSpec
    generator: Generator
    to_raw: Callable[[Scalar], Scalar]


@dataclass(slots=True)
class _Cpu:
    device: S7Device
    tags: list[_SimTag]
    memory: dict[tuple[str, int], bytearray]
    remote_tsap: int
    refreshed: float = -math.inf
    requests: int = 0
    writes: int = 0
    # (area key, byte) written by a client: the tags there keep the written value.
    held: set[tuple[tuple[str, int], int]] = field(default_factory=set)
    server: asyncio.Server | None = None
    host: str = "127.0.0.1"
    port: int = 0
    connections: set[asyncio.StreamWriter] = field(default_factory=set)


def _build_cpu(device: S7Device, seed: int) -> _Cpu:
    sizes: dict[tuple[str, int], int] = {}
    tags: list[_SimTag] = []
    for number, tag in enumerate(device.tags):
        addr = tag.resolved_address()
        key = (addr.area, addr.db)
        sizes[key] = max(sizes.get(key, 0), addr.byte + tag.size())
        kind, lo, hi, to_raw = _raw_converter(tag)
        if tag.resolved_type() == "date_and_time" and tag.simulate is None:
            spec = default_spec("str")
            generator: Generator = lambda t: "2026-01-01T00:00:00.000"  # noqa: E731
        else:
            spec = tag.simulate or default_spec(kind, lo, hi)
            generator = make_generator(spec, kind, lo=lo, hi=hi, seed=seed + number)
        tags.append(_SimTag(tag, key, addr.byte, spec_of(tag), generator, to_raw))
    memory = {key: bytearray(size) for key, size in sizes.items()}
    return _Cpu(device, tags, memory, device.tsaps()[1])


class S7Simulator:
    """Serves simulated S7 CPUs for `devices` (async context manager).

    `endpoints[name]` is the (host, port) a device listens on once started;
    `request_count(name)` counts the S7 jobs it received (setup included).
    """

    def __init__(
        self,
        devices: Sequence[S7Device],
        *,
        update_interval_s: float = 0.1,
        seed: int = 0,
        put_get: bool = True,
        optimized_dbs: Collection[int] = (),
        grant_pdu: int | None = None,
        write_protected_dbs: Collection[int] = (),
    ) -> None:
        self.update_interval_s = update_interval_s
        self.write_protected_dbs = frozenset(write_protected_dbs)
        self.put_get = put_get
        self.optimized_dbs = frozenset(optimized_dbs)
        self.grant_pdu = grant_pdu
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._cpus: dict[str, _Cpu] = {}
        self._t0 = 0.0
        for number, device in enumerate(devices):
            if device.name in self._cpus:
                raise ValueError(f"device {device.name!r} is configured twice")
            self._cpus[device.name] = _build_cpu(device, seed + 1000 * number)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        try:
            for cpu in self._cpus.values():
                await self._start_cpu(cpu)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for cpu in self._cpus.values():
            server, cpu.server = cpu.server, None
            if server is not None:
                server.close()
            for writer in list(cpu.connections):
                writer.close()
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.stop()

    async def __aenter__(self) -> S7Simulator:
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
        """Write items the simulated CPU accepted since start."""
        return self._cpus[device_name].writes

    def drop_connections(self, device_name: str) -> None:
        """Close every client connection of a device (tests of connection loss)."""
        for writer in list(self._cpus[device_name].connections):
            writer.close()

    # ------------------------------------------------------------------ internals

    async def _start_cpu(self, cpu: _Cpu) -> None:
        host = _loopback(cpu.device.host)
        ports = [0] if cpu.device.port == 0 else [cpu.device.port, 0]
        for port in ports:
            try:
                server = await asyncio.start_server(self._handler(cpu), host, port)
            except OSError:
                if port == 0:
                    raise
                log.warning("s7.simulator.port_busy", endpoint=f"{host}:{port}", fallback="free")
                continue
            cpu.server, cpu.host = server, host
            cpu.port = int(server.sockets[0].getsockname()[1])
            break
        self.endpoints[cpu.device.name] = (cpu.host, cpu.port)
        log.info(
            "s7.simulator.started",
            device=cpu.device.name,
            endpoint=f"{cpu.host}:{cpu.port}",
            tags=len(cpu.device.tags),
        )

    def _handler(self, cpu: _Cpu) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(self._serve(cpu, reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return spawn

    async def _serve(
        self, cpu: _Cpu, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cpu.connections.add(writer)
        try:
            tpdu = await _read_tpdu(reader)
            try:
                _, remote = codec.parse_cotp_connect(tpdu)
            except codec.FrameError:
                return
            if remote != cpu.remote_tsap:
                writer.write(codec.cotp_disconnect(tpdu))
                await writer.drain()
                return
            writer.write(codec.cotp_connect_confirm(tpdu))
            await writer.drain()
            pdu_size = 240
            while True:
                tpdu = await _read_tpdu(reader)
                if len(tpdu) < 3 or tpdu[1] != 0xF0:
                    return
                pdu = tpdu[3:]
                if len(pdu) < codec.JOB_HEADER or pdu[0] != 0x32 or pdu[1] != 1:
                    return
                cpu.requests += 1
                ref = int.from_bytes(pdu[4:6], "big")
                func = pdu[codec.JOB_HEADER] if len(pdu) > codec.JOB_HEADER else -1
                if func == codec.FUNC_SETUP:
                    asked = int.from_bytes(pdu[16:18], "big")
                    pdu_size = min(asked, self.grant_pdu or cpu.device.pdu_size)
                    params = struct.pack(">BBHHH", codec.FUNC_SETUP, 0, 1, 1, pdu_size)
                    answer = codec.ack_data(ref, params)
                elif func == codec.FUNC_READ:
                    answer = self._read(cpu, pdu, ref, pdu_size)
                elif func == codec.FUNC_WRITE:
                    answer = self._write(cpu, pdu, ref, pdu_size)
                else:
                    answer = codec.ack_error(ref, 0x8104)
                writer.write(codec.cotp_data(answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, codec.FrameError):
            pass
        finally:
            cpu.connections.discard(writer)
            writer.close()

    def _read(self, cpu: _Cpu, pdu: bytes, ref: int, pdu_size: int) -> bytes:
        if not self.put_get:
            return codec.ack_error(ref, 0x8104)
        if len(pdu) > pdu_size:
            return codec.ack_error(ref, 0x8500)
        count = pdu[codec.JOB_HEADER + 1]
        specs = pdu[codec.JOB_HEADER + 2 :]
        if len(specs) != count * codec.ITEM_SPEC:
            return codec.ack_error(ref, 0x8500)
        now = asyncio.get_running_loop().time()
        if now - cpu.refreshed >= self.update_interval_s:
            cpu.refreshed = now
            self._refresh(cpu, now - self._t0)
        data = bytearray()
        for i in range(count):
            spec = specs[i * 12 : i * 12 + 12]
            ts, n, db, area_code = struct.unpack_from(">BHHB", spec, 3)
            address = int.from_bytes(spec[9:12], "big")
            area = _CODE_AREA.get(area_code)
            width = _TS_WIDTH.get(ts)
            last = i == count - 1
            if spec[:3] != b"\x12\x0a\x10" or area is None or width is None:
                data += b"\x06\x00\x00\x00"  # data type not supported
                continue
            memory = cpu.memory.get((area, db if area == "DB" else 0))
            if area == "DB" and db in self.optimized_dbs:
                data += b"\x05\x00\x00\x00"
                continue
            if memory is None:
                data += b"\x0a\x00\x00\x00" if area == "DB" else b"\x05\x00\x00\x00"
                continue
            start, bit = address >> 3, address & 7
            if ts == codec.TS_BIT:
                if n != 1 or start >= len(memory):
                    data += b"\x05\x00\x00\x00"
                    continue
                data += b"\xff\x03\x00\x01" + bytes((memory[start] >> bit & 1,))
                if not last:
                    data += b"\x00"
                continue
            size = n * width
            if bit or start + size > len(memory):
                data += b"\x05\x00\x00\x00"
                continue
            data += b"\xff\x04" + struct.pack(">H", size * 8) + memory[start : start + size]
            if size & 1 and not last:
                data += b"\x00"
        if codec.ACK_HEADER + 2 + len(data) > pdu_size:
            return codec.ack_error(ref, 0x8500)
        return codec.ack_data(ref, bytes((codec.FUNC_READ, count)), bytes(data))

    def _write(self, cpu: _Cpu, pdu: bytes, ref: int, pdu_size: int) -> bytes:
        if not self.put_get:
            return codec.ack_error(ref, 0x8104)
        if len(pdu) > pdu_size:
            return codec.ack_error(ref, 0x8500)
        plen, dlen = struct.unpack_from(">HH", pdu, 6)
        count = pdu[codec.JOB_HEADER + 1]
        if plen != 2 + count * codec.ITEM_SPEC or codec.JOB_HEADER + plen + dlen != len(pdu):
            return codec.ack_error(ref, 0x8500)
        specs = pdu[codec.JOB_HEADER + 2 : codec.JOB_HEADER + plen]
        data = pdu[codec.JOB_HEADER + plen :]
        now = asyncio.get_running_loop().time()
        if now - cpu.refreshed >= self.update_interval_s:
            cpu.refreshed = now
            self._refresh(cpu, now - self._t0)
        codes = bytearray()
        pos = 0
        for i in range(count):
            spec = specs[i * 12 : i * 12 + 12]
            ts, n, db, area_code = struct.unpack_from(">BHHB", spec, 3)
            address = int.from_bytes(spec[9:12], "big")
            if pos + 4 > len(data):
                return codec.ack_error(ref, 0x8500)
            data_ts, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
            size = length if data_ts in (0x06, 0x07, 0x08, 0x09) else (length + 7) // 8
            value = data[pos + 4 : pos + 4 + size]
            pos += 4 + size + (size & 1 if i < count - 1 else 0)
            codes.append(self._store(cpu, ts, n, db, area_code, address, data_ts, value))
        if pos != len(data):
            return codec.ack_error(ref, 0x8500)
        return codec.ack_data(ref, bytes((codec.FUNC_WRITE, count)), bytes(codes))

    def _store(
        self,
        cpu: _Cpu,
        ts: int,
        n: int,
        db: int,
        area_code: int,
        address: int,
        data_ts: int,
        value: bytes,
    ) -> int:
        """Store one write item; its return code (0xFF success)."""
        area = _CODE_AREA.get(area_code)
        width = _TS_WIDTH.get(ts)
        if area is None or width is None:
            return 0x06
        key = (area, db if area == "DB" else 0)
        memory = cpu.memory.get(key)
        if area == "DB" and db in self.write_protected_dbs:
            return 0x03
        if memory is None:
            return 0x0A if area == "DB" else 0x05
        start, bit = address >> 3, address & 7
        if ts == codec.TS_BIT:
            if n != 1 or data_ts != codec.DATA_TS_BIT or len(value) != 1 or value[0] > 1:
                return 0x07
            if start >= len(memory):
                return 0x05
            mask = 1 << bit
            memory[start] = memory[start] | mask if value[0] else memory[start] & ~mask
            cpu.held.add((key, start))
            cpu.writes += 1
            return 0xFF
        size = n * width
        if len(value) != size:
            return 0x07
        if bit or start + size > len(memory):
            return 0x05
        memory[start : start + size] = value
        cpu.held.update((key, b) for b in range(start, start + size))
        cpu.writes += 1
        return 0xFF

    @staticmethod
    def _refresh(cpu: _Cpu, t: float) -> None:
        for sim in cpu.tags:
            if cpu.held and any(
                (sim.key, b) in cpu.held for b in range(sim.byte, sim.byte + sim.spec.size)
            ):
                continue
            memory = cpu.memory[sim.key]
            try:
                raw = encode(sim.spec, sim.to_raw(sim.generator(t)))
            except (CodecError, ValueError, TypeError, OverflowError) as exc:
                log.debug("s7.simulator.encode_failed", tag=sim.tag.name, error=str(exc))
                continue
            if sim.spec.data_type == "bool":
                mask = 1 << sim.spec.bit
                memory[sim.byte] = (memory[sim.byte] & ~mask) | raw[0]
            else:
                memory[sim.byte : sim.byte + len(raw)] = raw


async def _read_tpdu(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    if head[0] != 3:
        raise codec.FrameError("not TPKT")
    length = int.from_bytes(head[2:4], "big")
    if length < 7:
        raise codec.FrameError("bad TPKT length")
    return await reader.readexactly(length - 4)
