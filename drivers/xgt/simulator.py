"""Simulated XGT PLCs speaking the FEnet dedicated protocol, serving exactly their config.

Each device gets a TCP server of its own (asyncio) on loopback; a device whose port is 0,
busy, or already used by another simulated device gets a free port from the OS, and
`endpoints` tells where each one listens.

It parses requests as the FEnet manual describes them and answers as a PLC does:

- header: company id "LSIS-XGT" (or "LGIS-GLOFA"), else NAK 0x75; the length must fit,
  else NAK 0x76 and the connection is closed; a BCC that is neither 0 nor the byte sum of
  the header gets NAK 0x77;
- instruction: reads and writes (individual, data types X/B/W/D/L, and continuous);
  anything else gets NAK 0x78; data types, block counts and byte counts checked with the
  manual's codes (0x01, 0x02, 0x05); a bit write whose data is not 00 or 01 gets 0x22;
- writes are stored as sent and every tag they touch stops following its generator: the
  next read returns the written value, so a commissioning can be rehearsed. Writes touch
  only configured bytes, like reads (else 0x04); the FEnet manual documents no refusal
  for a read-only area, so the areas the driver refuses to write (F, IEC inputs, timer and
  counter contacts) are its own policy and the simulator accepts them;
- variables: an area the configured CPU does not serve gets 0x03; a read touching any
  byte (bit, for contacts) that no tag of the config occupies gets 0x04 (address beyond
  the device area), so a typo in a config shows as a bad quality, not as a zero;
- answers carry PLC info (CPU type, RUN), the CPU info byte of the configured CPU,
  source 0x11, the request's invoke id and FEnet position, and a correct BCC.

Values come from `drivers.generators` in engineering units and are turned back into raw
values (raw = (value - offset) / scale, rounded and clamped for integer types), then
encoded with our own codec, little-endian as XGT memory is. They are refreshed lazily:
when a request arrives more than `update_interval_s` after the last refresh.

`set_fault(device, fn)` lets a test replace every answer of a device with `fn(answer)`:
other bytes, or None for no answer at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import structlog

from drivers.base import Scalar
from drivers.generators import Generator, Kind, default_spec, make_generator
from drivers.xgt.codec import (
    CMD_READ_ACK,
    CMD_WRITE,
    DATA_TYPE,
    DT_CONTINUOUS,
    HEADER_LEN,
    SOURCE_RESPONSE,
    CodecError,
    NakError,
    ValueSpec,
    bcc,
    decode_header,
    encode_frame,
    encode_nak,
    encode_read_response,
    encode_value,
    encode_write_response,
    parse_read_request,
    parse_write_request,
)
from drivers.xgt.config import (
    AREAS,
    CONTACT_AREAS,
    CPU_INFO,
    UNIT_BYTES,
    Address,
    XgtDevice,
    XgtTag,
)

__all__ = ["XgtSimulator"]

log = structlog.get_logger(__name__)

_FLOAT32_MAX = 3.4028234663852886e38
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "uint8": (0, (1 << 8) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}
#: PLC info of answers: bits 0-5 CPU type, bits 8-12 system status (1 = RUN).
_PLC_TYPE = {"XGK": 0x01, "XGI": 0x05, "XGR": 0x01, "XGB_MK": 0x06, "XGB_IEC": 0x06}
_RUN = 0x0100
_DT_SIZE = {code: letter for letter, code in DATA_TYPE.items()}

Fault = Callable[[bytes], bytes | None]


def _loopback(host: str) -> str:
    try:
        return host if ipaddress.ip_address(host).is_loopback else "127.0.0.1"
    except ValueError:
        return "127.0.0.1"


def _raw_converter(
    tag: XgtTag,
) -> tuple[Kind, float | None, float | None, Callable[[Scalar], Scalar]]:
    """Generator kind, engineering range and engineering → raw conversion for `tag`."""
    t = tag.resolved_type()
    if t in ("bool", "bit"):
        return "bool", None, None, bool
    if t == "string":
        size = tag.byte_count()

        def to_text(value: Scalar) -> Scalar:
            return str(value).encode("ascii", "replace").decode("ascii")[:size]

        return "str", None, None, to_text
    scale, offset = tag.scale, tag.offset
    limits = _INT_RANGE.get(t)
    if limits is None:
        cap = _FLOAT32_MAX if t == "float32" else math.inf

        def to_float(value: Scalar) -> Scalar:
            raw = (float(value) - offset) / scale if scale else float(value)
            return min(max(raw, -cap), cap)

        return "float", None, None, to_float
    rmin, rmax = limits
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
    tag: XgtTag
    area: str
    byte: int
    bit: int  # bool/bit: bit number from `byte`; contacts: the contact number
    spec: ValueSpec
    contact: bool
    generator: Generator
    to_raw: Callable[[Scalar], Scalar]


@dataclass(slots=True)
class _Plc:
    device: XgtDevice
    tags: list[_SimTag]
    memory: dict[str, bytearray]
    mask: dict[str, bytearray]
    contacts: dict[str, dict[int, bool]]
    refreshed: float = -math.inf
    requests: int = 0
    writes: int = 0
    # (area, byte) written by a client, and written contacts: their tags keep the value.
    held: set[tuple[str, int]] = field(default_factory=set)
    fault: Fault | None = None
    host: str = "127.0.0.1"
    port: int = 0
    server: asyncio.Server | None = None
    connections: set[asyncio.StreamWriter] = field(default_factory=set)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)


def _build(device: XgtDevice, seed: int) -> _Plc:
    sizes: dict[str, int] = {}
    tags: list[_SimTag] = []
    contacts: dict[str, dict[int, bool]] = {}
    for number, tag in enumerate(device.tags):
        addr = tag.parsed()
        kind, lo, hi, to_raw = _raw_converter(tag)
        spec_sim = tag.simulate or default_spec(kind, lo, hi)
        generator = make_generator(spec_sim, kind, lo=lo, hi=hi, seed=seed + number)
        t = tag.resolved_type()
        contact = addr.area in CONTACT_AREAS and t == "bool"
        if contact:
            bit = addr.offset
            contacts.setdefault(addr.area, {})[bit] = False
        else:
            bit = addr.offset % 8 if t == "bool" else (tag.bit or 0)
            sizes[addr.area] = max(sizes.get(addr.area, 0), addr.byte_offset + tag.byte_count())
        spec = ValueSpec(t, bit=bit if not contact else 0, length=tag.length or 0)
        tags.append(
            _SimTag(tag, addr.area, addr.byte_offset, bit, spec, contact, generator, to_raw)
        )
    memory = {area: bytearray(size) for area, size in sizes.items()}
    mask = {area: bytearray(size) for area, size in sizes.items()}
    for sim in tags:
        if not sim.contact:
            count = sim.tag.byte_count()
            mask[sim.area][sim.byte : sim.byte + count] = b"\x01" * count
    return _Plc(device, tags, memory, mask, contacts)


class XgtSimulator:
    """Serves simulated XGT PLCs for `devices` (async context manager).

    `endpoints[name]` is the (host, port) a device listens on once started;
    `request_count(name)` counts the frames it received (valid or not)."""

    def __init__(
        self, devices: Sequence[XgtDevice], *, update_interval_s: float = 0.1, seed: int = 0
    ) -> None:
        self.update_interval_s = update_interval_s
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._plcs: dict[str, _Plc] = {}
        self._t0 = 0.0
        taken: dict[tuple[str, int], str] = {}
        for number, device in enumerate(devices):
            if device.name in self._plcs:
                raise ValueError(f"device {device.name!r} is configured twice")
            plc = _build(device, seed + 1000 * number)
            plc.host, plc.port = _loopback(device.host), device.port
            if plc.port:
                # PLCs on different hosts all land on loopback: the second one of a port
                # gets a free port from the OS (said in `endpoints` and the log).
                other = taken.setdefault((plc.host, plc.port), device.name)
                if other != device.name:
                    plc.port = 0
            self._plcs[device.name] = plc

    async def start(self) -> None:
        """Start every server; afterwards `endpoints` is complete."""
        self._t0 = asyncio.get_running_loop().time()
        try:
            for plc in self._plcs.values():
                await self._start(plc)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every server and drop its client connections."""
        for plc in self._plcs.values():
            server, plc.server = plc.server, None
            if server is not None:
                server.close()
            for writer in list(plc.connections):
                writer.close()
            handlers = list(plc.handlers)
            for task in handlers:
                task.cancel()
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.wait_closed()

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled, then stop."""
        if not self.endpoints:
            await self.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.stop()

    async def __aenter__(self) -> XgtSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def request_count(self, name: str) -> int:
        return self._plcs[name].requests

    def write_count(self, name: str) -> int:
        """Write requests device `name` accepted since start."""
        return self._plcs[name].writes

    def set_fault(self, name: str, fault: Fault | None) -> None:
        """Replace every answer of device `name` with `fault(answer)` (None: no answer)."""
        self._plcs[name].fault = fault

    def drop_connections(self, name: str) -> None:
        """Close every client connection of device `name` (the server keeps listening)."""
        for writer in list(self._plcs[name].connections):
            writer.close()

    # ------------------------------------------------------------------ internals

    async def _start(self, plc: _Plc) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            plc.handlers.add(task)
            try:
                await self._serve(plc, reader, writer)
            except asyncio.CancelledError:
                pass  # the simulator is stopping: the connection is dropped
            finally:
                plc.handlers.discard(task)

        ports = [plc.port] if plc.port == 0 else [plc.port, 0]
        for port in ports:
            try:
                plc.server = await asyncio.start_server(handle, plc.host, port)
            except OSError:
                if port == 0:
                    raise
                log.warning("xgt.simulator.port_busy", endpoint=f"{plc.host}:{port}")
                continue
            plc.port = int(plc.server.sockets[0].getsockname()[1])
            break
        self.endpoints[plc.device.name] = (plc.host, plc.port)
        log.info(
            "xgt.simulator.started",
            device=plc.device.name,
            endpoint=f"{plc.host}:{plc.port}",
            cpu=plc.device.cpu,
            tags=len(plc.device.tags),
        )

    async def _serve(
        self, plc: _Plc, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        plc.connections.add(writer)
        try:
            while True:
                head = await reader.readexactly(HEADER_LEN)
                length = int.from_bytes(head[16:18], "little")
                if length > 1500:  # the frame cannot be delimited: refuse and hang up
                    plc.requests += 1
                    writer.write(self._answer(plc, head, encode_nak(CMD_READ_ACK, 0, 0x76)))
                    await writer.drain()
                    return
                body = await reader.readexactly(length)
                plc.requests += 1
                answer = self._answer(plc, head, self._respond(plc, head, body))
                if plc.fault is not None:
                    changed = plc.fault(answer)
                    if changed is None:
                        continue
                    answer = changed
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            plc.connections.discard(writer)
            writer.close()

    def _answer(self, plc: _Plc, head: bytes, instruction: bytes) -> bytes:
        invoke_id, position = struct.unpack_from("<H", head, 14)[0], head[18]
        return encode_frame(
            instruction,
            invoke_id=invoke_id,
            cpu_info=CPU_INFO[plc.device.cpu],
            position=position,
            source=SOURCE_RESPONSE,
            plc_info=_PLC_TYPE[plc.device.cpu] | _RUN,
        )

    def _respond(self, plc: _Plc, head: bytes, body: bytes) -> bytes:
        command = int.from_bytes(body[0:2], "little") if len(body) >= 2 else 0
        data_type = int.from_bytes(body[2:4], "little") if len(body) >= 4 else 0
        ack = command + 1 if command in (0x54, 0x58) else CMD_READ_ACK
        try:
            try:
                header = decode_header(head)
            except ValueError:
                raise NakError(0x75) from None
            if header.source != 0x33:
                raise NakError(0x75, f"source 0x{header.source:02X}")
            if head[19] not in (0, bcc(head)):
                raise NakError(0x77)
            now = asyncio.get_running_loop().time()
            if now - plc.refreshed >= self.update_interval_s:
                plc.refreshed = now
                self._refresh(plc, now - self._t0)
            if command == CMD_WRITE:
                write = parse_write_request(body)
                self._write(plc, write.data_type, write.names, write.data)
                plc.writes += 1
                return encode_write_response(write.data_type, len(write.data))
            request = parse_read_request(body)
            if request.data_type == DT_CONTINUOUS:
                blocks = [self._read_bytes(plc, request.names[0], request.count)]
            else:
                size = _DT_SIZE[request.data_type]
                blocks = [self._read_variable(plc, name, size) for name in request.names]
        except NakError as exc:
            return encode_nak(ack, data_type, exc.code)
        return encode_read_response(request.data_type, blocks)

    def _address(self, plc: _Plc, name: str, size: str) -> Address:
        try:
            addr = Address.parse(name)
        except ValueError:
            raise NakError(0x22, name) from None
        if addr.size != size:
            raise NakError(0x02, f"{name} in a {size} request")
        if addr.area not in AREAS[plc.device.cpu]:
            raise NakError(0x03, name)
        return addr

    def _read_bytes(self, plc: _Plc, name: str, count: int) -> bytes:
        addr = self._address(plc, name, "B")
        start, mask = addr.offset, plc.mask.get(addr.area, bytearray())
        if start + count > len(mask) or mask.find(0, start, start + count) != -1:
            raise NakError(0x04, f"{name} x {count}")
        return bytes(plc.memory[addr.area][start : start + count])

    def _read_variable(self, plc: _Plc, name: str, size: str) -> bytes:
        addr = self._address(plc, name, size)
        if size == "X":
            if addr.area in CONTACT_AREAS:
                value = plc.contacts.get(addr.area, {}).get(addr.offset)
                if value is None:
                    raise NakError(0x04, name)
                return b"\x01" if value else b"\x00"
            byte = self._read_bytes_at(plc, addr.area, addr.offset // 8, 1, name)
            return b"\x01" if byte[0] >> (addr.offset % 8) & 1 else b"\x00"
        count = UNIT_BYTES[size]
        return self._read_bytes_at(plc, addr.area, addr.offset * count, count, name)

    def _write(
        self, plc: _Plc, data_type: int, names: Sequence[str], data: Sequence[bytes]
    ) -> None:
        """Apply a parsed write, all of it or (on a NAK) none of it."""
        changes: list[tuple[str, int, bytes | None, int, bool]] = []
        if data_type == DT_CONTINUOUS:
            addr = self._address(plc, names[0], "B")
            self._check_span(plc, addr.area, addr.offset, len(data[0]), names[0])
            changes.append((addr.area, addr.offset, data[0], 0, False))
        else:
            size = _DT_SIZE[data_type]
            for name, value in zip(names, data, strict=True):
                addr = self._address(plc, name, size)
                if size == "X":
                    if value not in (b"\x00", b"\x01"):
                        raise NakError(0x22, f"bit data {value.hex()}")
                    if addr.area in CONTACT_AREAS:
                        if addr.offset not in plc.contacts.get(addr.area, {}):
                            raise NakError(0x04, name)
                        changes.append((addr.area, addr.offset, None, 0, value == b"\x01"))
                        continue
                    self._check_span(plc, addr.area, addr.offset // 8, 1, name)
                    changes.append(
                        (addr.area, addr.offset // 8, None, addr.offset % 8, value == b"\x01")
                    )
                    continue
                count = UNIT_BYTES[size]
                if len(value) != count:
                    raise NakError(0x76, f"{name}: {len(value)} bytes for a {size} variable")
                self._check_span(plc, addr.area, addr.offset * count, count, name)
                changes.append((addr.area, addr.offset * count, value, 0, False))
        for area, start, block, bit, on in changes:
            if block is not None:
                plc.memory[area][start : start + len(block)] = block
                plc.held.update((area, b) for b in range(start, start + len(block)))
            elif area in CONTACT_AREAS:
                plc.contacts[area][start] = on
                plc.held.add((area, -1 - start))  # contacts: negative keys
            else:
                memory = plc.memory[area]
                memory[start] = memory[start] | (1 << bit) if on else memory[start] & ~(1 << bit)
                plc.held.add((area, start))

    @staticmethod
    def _check_span(plc: _Plc, area: str, start: int, count: int, name: str) -> None:
        mask = plc.mask.get(area, bytearray())
        if start + count > len(mask) or mask.find(0, start, start + count) != -1:
            raise NakError(0x04, name)

    @staticmethod
    def _read_bytes_at(plc: _Plc, area: str, start: int, count: int, name: str) -> bytes:
        mask = plc.mask.get(area, bytearray())
        if start + count > len(mask) or mask.find(0, start, start + count) != -1:
            raise NakError(0x04, name)
        return bytes(plc.memory[area][start : start + count])

    @staticmethod
    def _refresh(plc: _Plc, t: float) -> None:
        held = plc.held
        for sim in plc.tags:
            if held:
                if sim.contact:
                    if (sim.area, -1 - sim.bit) in held:
                        continue
                elif any(
                    (sim.area, b) in held for b in range(sim.byte, sim.byte + sim.tag.byte_count())
                ):
                    continue
            raw = sim.to_raw(sim.generator(t))
            if sim.contact:
                plc.contacts[sim.area][sim.bit] = bool(raw)
                continue
            memory = plc.memory[sim.area]
            if sim.spec.data_type in ("bool", "bit"):
                index = sim.byte + sim.bit // 8
                mask = 1 << (sim.bit % 8)
                memory[index] = (memory[index] | mask) if raw else (memory[index] & ~mask)
                continue
            try:
                data = encode_value(sim.spec, raw)
            except (CodecError, ValueError, TypeError, OverflowError) as exc:
                log.debug("xgt.simulator.encode_failed", tag=sim.tag.name, error=str(exc))
                continue
            memory[sim.byte : sim.byte + len(data)] = data
