"""MELSEC driver: SLMP binary 3E/4E over TCP (or UDP), with our own frame codec.

One request in flight at a time: a MELSEC CPU answers two pipelined 3E requests with one
answer, for the wrong request, so the link never pipelines. Every answer is checked
against the request it answers before anything is decoded (subheader, serial number on
4E, route echo, length, data length); a frame that does not fit fails the request at
once with `DriverUnavailable("protocol error: …")`, the poller closes the connection and
reconnects, so a late or stray frame is never taken for a later answer.

Retries (`retries` in the device config) are made only on 4E frames: there the serial
number tells a late answer to the first try from the answer to the retry. On 3E a
timeout closes the connection (`DriverUnavailable("timeout")`).

An end code concerns the request it answers: its tags are bad with the code and its
meaning. An address end code (0xC056 past the largest address, 0x4031 out of range,
0x4030 / 0xC05B / 0xC05C device not available) on a request of several tags starts
isolation: the request is split by tag to find the refused tags, the rest keeps
reporting, and the whole request is tried again every `isolation_retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, cast

import structlog

from drivers.base import DriverError, DriverUnavailable, RawReading, Scalar, Value, WriteRefused
from drivers.melsec.codec import (
    ADDRESS_CODES,
    ANSWER_HEADER,
    CMD_BATCH_READ,
    CMD_BATCH_WRITE,
    SUB_BIT,
    SUB_WORD,
    CodecError,
    DecodeFailure,
    Route,
    batch_read_body,
    batch_write_body,
    encode_bit_points,
    encode_raw,
    end_code_reason,
    parse_answer_header,
    request_frame,
)
from drivers.melsec.config import Address, MelsecDevice, Series
from drivers.melsec.plan import DevicePlan, GroupPlan, Request, TagSlot, plan_device, sub_batch

__all__ = ["ERROR_ANSWER_MAX", "MelsecDriver", "WriteRequest"]

log = structlog.get_logger(__name__)

#: Largest length field of an answer with an end code (the end code and the request's
#: route and command: 11 bytes; some modules add a little). An answer is accepted only up
#: to max(its request's data + 2, this): anything longer is garbage, not a big answer.
ERROR_ANSWER_MAX = 64

#: End codes saying the random read command itself is not accepted (command not
#: supported, not executable on this CPU): the driver falls back to batch reads.
RANDOM_UNSUPPORTED = frozenset({0xC059, 0xC05F})

# Serial numbers of retried 4E requests whose late answers are still discarded.
_STALE_MAX = 8


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One request of a write: batch write 1401 (word or bit units), or the batch read
    0401 of one word that a read-modify-write starts with. Quacks like a plan Request
    where the exchange needs it (command, subcommand, body, data_length, describe)."""

    command: int
    subcommand: int
    body: bytes
    data_length: int
    text: str

    def describe(self) -> str:
        return self.text


class _Link(asyncio.Protocol):
    """The TCP connection: collects bytes, wakes the waiting request, notes loss."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.buf = bytearray()
        self.transport: asyncio.BaseTransport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.lost_reason = "connection lost"
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, data: bytes) -> None:
        assert isinstance(self.transport, asyncio.Transport)
        self.transport.write(data)

    def abort(self) -> None:
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is not None:
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _UdpLink(_Link, asyncio.DatagramProtocol):
    """The UDP 'connection': one answer per datagram, appended like TCP bytes so the same
    checks apply. A port-unreachable ICMP reply is a refused connection."""

    def send(self, data: bytes) -> None:
        # asyncio's selector datagram transport is not a DatagramTransport subclass.
        transport = cast(asyncio.DatagramTransport, self.transport)
        transport.sendto(data)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.data_received(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self.lost_reason = "connection refused"
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()


class _Answer:
    """An answer's end code and data (data only when the end code is 0)."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code
        self.data = data


@dataclass(slots=True)
class _Isolation:
    good: list[Request]
    bad: list[tuple[tuple[TagSlot, ...], int]]
    retry_at: float


class _RandomUnsupported(Exception):
    def __init__(self, answer: _Answer) -> None:
        self.answer = answer


class _NotIsolable(Exception):
    def __init__(self, answer: _Answer) -> None:
        self.answer = answer


@dataclass(slots=True)
class _Columns:
    values: list[Value | None]
    bad: dict[int, RawReading]


class MelsecDriver:
    """Reads one MELSEC CPU. See the module docstring for the fault behaviour."""

    def __init__(self, device: MelsecDevice, *, isolation_retry_s: float | None = None) -> None:
        self.device = device
        self.plan: DevicePlan = plan_device(device)
        self.isolation_retry_s = (
            device.isolation_retry_s if isolation_retry_s is None else isolation_retry_s
        )
        self.endpoint = f"{device.host}:{device.port}"
        self._route = Route(
            device.network, device.station, device.module_io, device.multidrop_station
        )
        self._route_bytes = self._route.pack()
        self._timer = device.monitoring_timer()
        self._frame = device.frame
        self._header = ANSWER_HEADER[device.frame]
        self._link: _Link | None = None
        self._serial = 0
        self._stale: set[int] = set()
        self._frames3e: dict[int, tuple[Request | WriteRequest, bytes]] = {}
        self._isolated: dict[tuple[str, int], _Isolation] = {}
        self._log = log.bind(device=device.name, endpoint=self.endpoint)
        self._tags = {t.name: t for t in device.tags}
        # One request in flight (a poll and a write may run at once); one write at a time
        # (a read-modify-write of a word's bit holds it from the read to the write).
        self._io_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        #: Requests sent since connect (tests and the bench read it).
        self.requests_sent = 0

    # ------------------------------------------------------------------ contract

    def group_plan(self, group: str) -> GroupPlan:
        plan = self.plan.groups.get(group)
        if plan is None:
            raise KeyError(f"device {self.device.name!r} has no tags in poll group {group!r}")
        return plan

    def active_requests(self, group: str) -> list[Request]:
        """The requests a poll of `group` makes now (isolated requests by their parts)."""
        out: list[Request] = []
        for number, request in enumerate(self.group_plan(group).requests):
            iso = self._isolated.get((group, number))
            out.extend(iso.good if iso is not None else (request,))
        return out

    async def connect(self) -> None:
        """Open the TCP connection. Raises DriverUnavailable ("connection refused" or
        "timeout")."""
        await self.close()
        loop = asyncio.get_running_loop()
        link = _UdpLink(loop) if self.device.transport == "udp" else _Link(loop)
        try:
            async with asyncio.timeout(self.device.timeout_s):
                if self.device.transport == "udp":
                    await loop.create_datagram_endpoint(
                        lambda: link, remote_addr=(self.device.host, self.device.port)
                    )
                else:
                    await loop.create_connection(lambda: link, self.device.host, self.device.port)
        except TimeoutError:
            raise DriverUnavailable(
                "timeout", f"{self.endpoint}: no answer within {self.device.timeout_s} s"
            ) from None
        except OSError as exc:
            raise DriverUnavailable("connection refused", f"{self.endpoint}: {exc}") from None
        self._link = link
        self._stale.clear()

    async def read(self, group: str) -> list[RawReading]:
        """One poll of `group`: one RawReading per tag, in config order (raw values)."""
        tags, values, bad = await self.read_columns(group)
        return [
            bad[i] if i in bad else RawReading(tag, value)
            for i, (tag, value) in enumerate(zip(tags, values, strict=True))
        ]

    async def read_columns(
        self, group: str
    ) -> tuple[Sequence[str], list[Value | None], dict[int, RawReading]]:
        """`read` in columns: (tags, values, bad readings by index)."""
        plan = self.group_plan(group)
        values: list[Value | None] = [None] * len(plan.tags)
        out = _Columns(values, {})
        try:
            for number, request in enumerate(plan.requests):
                await self._read_block((group, number), request, out)
        except _RandomUnsupported as exc:
            # Read this poll again with the batch reads the random reads stood for.
            self._drop_random_reads(group, exc.answer.code)
            return await self.read_columns(group)
        if None in values:
            for i, (tag, value) in enumerate(zip(plan.tags, values, strict=True)):
                if value is None and i not in out.bad:
                    out.bad[i] = RawReading(tag, None, "bad", "not read")
        return plan.tags, values, out.bad

    async def close(self) -> None:
        """Close the connection; never raises."""
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(Exception):
                link.abort()

    # ------------------------------------------------------------------ writes

    async def write(self, tag: str, raw: Scalar) -> None:
        """Write tag `tag` with raw value `raw` (drivers.base.WritingDriver): batch write
        1401, in bit units (sub-command 0001) for a bit device, in word units (0000) for
        a value of word devices (all its words in one request). A bit of a word device
        (D100.3) is written by read-modify-write: batch read 0401 of the word, then 1401
        of the word with that bit changed, under this driver's write lock.

        Raises WriteRefused (a family the driver does not write, a value the type cannot
        hold: nothing sent), DriverError("end code 0x…") when the CPU refuses the request,
        DriverUnavailable when the outcome is unknown (timeout, connection lost, an
        answer that does not fit the request)."""
        config = self._tags.get(tag)
        if config is None:
            raise WriteRefused("unknown tag", f"no tag {tag!r} on device {self.device.name!r}")
        refusal = self.device.write_refusal(tag)
        if refusal is not None:
            raise WriteRefused("not writable", f"{tag}: {refusal}")
        addr = self.device.address_of(config)
        series = self.device.series
        data_type = config.resolved_type()
        text = addr.text(series)
        try:
            data = encode_raw(data_type, raw, config.word_count())
        except CodecError as exc:
            raise WriteRefused("value does not fit", f"{tag} ({data_type}): {exc}") from None
        code = addr.kind.code
        async with self._write_lock:
            try:
                if addr.kind.is_bit:
                    request = WriteRequest(
                        CMD_BATCH_WRITE,
                        SUB_BIT,
                        batch_write_body(addr.number, code, 1, encode_bit_points([bool(raw)])),
                        0,
                        f"batch write {text} (1 bit)",
                    )
                elif addr.bit is not None:
                    word_text = Address(addr.kind, addr.number).text(series)
                    read = WriteRequest(
                        CMD_BATCH_READ,
                        SUB_WORD,
                        batch_read_body(addr.number, code, 1),
                        2,
                        f"batch read {word_text} (1 word, read-modify-write of {text})",
                    )
                    answer = await self._exchange(read)
                    self._refused(answer, read)
                    current = int.from_bytes(answer.data, "little")
                    mask = 1 << addr.bit
                    word = current | mask if raw else current & ~mask
                    request = WriteRequest(
                        CMD_BATCH_WRITE,
                        SUB_WORD,
                        batch_write_body(addr.number, code, 1, word.to_bytes(2, "little")),
                        0,
                        f"batch write {word_text} (1 word, bit {addr.bit:X} of it)",
                    )
                else:
                    words = len(data) // 2
                    request = WriteRequest(
                        CMD_BATCH_WRITE,
                        SUB_WORD,
                        batch_write_body(addr.number, code, words, data),
                        0,
                        f"batch write {text} ({words} word{'' if words == 1 else 's'})",
                    )
                self._refused(await self._exchange(request), request)
            except DriverUnavailable as exc:
                # The outcome is unknown: drop the connection, so a late answer is never
                # taken for the answer to a later request (3E has no serial numbers).
                self._log.warning("melsec.write.unknown_outcome", tag=tag, reason=exc.reason)
                link = self._link
                if link is not None:
                    link.abort()
                raise

    def _refused(self, answer: _Answer, request: WriteRequest) -> None:
        if answer.code != 0:
            reason = end_code_reason(answer.code)
            self._log.warning("melsec.write.refused", request=request.describe(), reason=reason)
            raise DriverError(reason, f"{self.endpoint}: {request.describe()}", answer.code)

    def _drop_random_reads(self, group: str, code: int) -> None:
        """The CPU (or module) does not take random reads: plan `group` with batch reads
        only, for as long as this driver lives."""
        plan = self.group_plan(group)
        requests: list[Request] = []
        for request in plan.requests:
            requests.extend(request.parts if request.mode == "random" else (request,))
        self.plan.groups[group] = GroupPlan(plan.group, plan.interval_s, plan.tags, tuple(requests))
        for key in [k for k in self._isolated if k[0] == group]:
            del self._isolated[key]
        self._log.warning(
            "melsec.random_read.unsupported",
            group=group,
            reason=end_code_reason(code),
            requests=len(requests),
        )

    # ------------------------------------------------------------------ isolation

    async def _read_block(self, key: tuple[str, int], request: Request, out: _Columns) -> None:
        now = asyncio.get_running_loop().time()
        iso = self._isolated.get(key)
        if iso is not None and now < iso.retry_at:
            for sub in iso.good:
                answer = await self._exchange(sub)
                if answer.code in ADDRESS_CODES:
                    iso.retry_at = now  # the CPU changed again: isolate again next poll
                self._fill(sub, answer, out)
            for cluster, code in iso.bad:
                _fill_bad(cluster, code, out)
            return
        answer = await self._exchange(request)
        if request.mode == "random" and answer.code in RANDOM_UNSUPPORTED:
            raise _RandomUnsupported(answer)
        if answer.code not in ADDRESS_CODES:
            if iso is not None:
                if answer.code == 0:
                    del self._isolated[key]
                    self._log.info("melsec.block.recovered", block=request.describe())
                else:
                    iso.retry_at = now + self.isolation_retry_s
            self._fill(request, answer, out)
            return
        try:
            good, bad = await self._isolate(request, answer, out)
        except _NotIsolable as exc:
            self._fill(request, exc.answer, out)
            return
        spans = [_span(c, request.series) for c, _ in bad]
        if iso is None or [_span(c, request.series) for c, _ in iso.bad] != spans:
            self._log.warning(
                "melsec.block.isolated",
                block=request.describe(),
                bad=spans,
                bad_tags=[s.tag for c, _ in bad for s in c],
                reason=end_code_reason(bad[0][1] if bad else answer.code),
                requests=[r.describe() for r in good],
                retry_s=self.isolation_retry_s,
            )
        self._isolated[key] = _Isolation(good, bad, now + self.isolation_retry_s)

    async def _isolate(
        self, request: Request, answer: _Answer, out: _Columns
    ) -> tuple[list[Request], list[tuple[tuple[TagSlot, ...], int]]]:
        if request.mode == "random":
            good: list[Request] = []
            bad: list[tuple[tuple[TagSlot, ...], int]] = []
            for part in request.parts:
                part_answer = await self._exchange(part)
                if part_answer.code == 0:
                    good.append(part)
                    self._fill(part, part_answer, out)
                elif part_answer.code in ADDRESS_CODES:
                    g, b = await self._isolate(part, part_answer, out)
                    good += g
                    bad += b
                else:
                    raise _NotIsolable(part_answer)
            return good, bad
        return await self._isolate_batch(request, answer.code, out)

    async def _isolate_batch(
        self, request: Request, code: int, out: _Columns
    ) -> tuple[list[Request], list[tuple[tuple[TagSlot, ...], int]]]:
        """Bisect a refused batch read by tag clusters; then read every run of good
        parts between two refused clusters as one request when the CPU accepts it."""
        parts = _clusters(request)
        found: list[tuple[Request | None, _Answer | None, tuple[TagSlot, ...], int]] = []

        async def split(group: list[tuple[TagSlot, ...]], code: int) -> None:
            if len(group) == 1:
                found.append((None, None, group[0], code))
                return
            mid = len(group) // 2
            for half in (group[:mid], group[mid:]):
                sub = sub_batch(request, [s for c in half for s in c])
                sub_answer = await self._exchange(sub)
                if sub_answer.code == 0:
                    found.append((sub, sub_answer, (), 0))
                elif sub_answer.code in ADDRESS_CODES:
                    await split(half, sub_answer.code)
                else:
                    raise _NotIsolable(sub_answer)

        await split(parts, code)
        good: list[Request] = []
        bad: list[tuple[tuple[TagSlot, ...], int]] = []
        run: list[tuple[Request, _Answer]] = []

        async def close_run() -> None:
            if len(run) > 1:
                whole = sub_batch(request, [s for r, _ in run for s in _originals(request, r)])
                whole_answer = await self._exchange(whole)
                if whole_answer.code == 0:
                    run[:] = [(whole, whole_answer)]
            for sub, sub_answer in run:
                good.append(sub)
                self._fill(sub, sub_answer, out)
            run.clear()

        for sub, sub_answer, cluster, bad_code in found:
            if sub is not None and sub_answer is not None:
                run.append((sub, sub_answer))
                continue
            await close_run()
            bad.append((cluster, bad_code))
            _fill_bad(cluster, bad_code, out)
        await close_run()
        return good, bad

    # ------------------------------------------------------------------ wire

    def _frame_of(self, request: Request | WriteRequest) -> bytes:
        if self._frame == "3e":
            # Cached per request object; the object is kept with its frame, so an id()
            # reused by a later (isolation) sub-request can never pick up this frame.
            cached = self._frames3e.get(id(request))
            if cached is None or cached[0] is not request:
                frame = request_frame(
                    "3e",
                    self._route,
                    self._timer,
                    request.command,
                    request.subcommand,
                    request.body,
                )
                if len(self._frames3e) > 4096:
                    self._frames3e.clear()
                cached = self._frames3e[id(request)] = (request, frame)
            return cached[1]
        self._serial = (self._serial + 1) & 0xFFFF
        return request_frame(
            "4e",
            self._route,
            self._timer,
            request.command,
            request.subcommand,
            request.body,
            self._serial,
        )

    async def _exchange(self, request: Request | WriteRequest) -> _Answer:
        """Send `request`, return its checked answer. Raises DriverUnavailable."""
        async with self._io_lock:
            return await self._exchange_locked(request)

    async def _exchange_locked(self, request: Request | WriteRequest) -> _Answer:
        link = self._link
        if link is None or link.transport is None:
            raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
        if link.lost.done():
            raise DriverUnavailable(link.lost_reason, f"{self.endpoint}: not connected")
        if link.buf and not self._stale:
            raise DriverUnavailable(
                "protocol error: unexpected data", f"{self.endpoint}: bytes between requests"
            )
        attempts = self.device.retries + 1 if self._frame == "4e" else 1
        for attempt in range(attempts):
            frame = self._frame_of(request)
            serial = self._serial
            link.send(frame)
            self.requests_sent += 1
            try:
                async with asyncio.timeout(self.device.timeout_s):
                    return await self._answer(link, request, serial)
            except TimeoutError:
                if link.buf:  # part of a frame: the stream is out of step, never retry
                    raise DriverUnavailable(
                        "protocol error: incomplete frame",
                        f"{self.endpoint}: answer to {request.describe()} stopped short",
                    ) from None
                if attempt + 1 < attempts:
                    if len(self._stale) >= _STALE_MAX:
                        self._stale.clear()  # so old that a late answer now means trouble
                    self._stale.add(serial)
                    continue
        raise DriverUnavailable(
            "timeout",
            f"{self.endpoint}: no answer to {request.describe()} within "
            f"{self.device.timeout_s} s x {attempts}",
        )

    async def _wait(self, link: _Link) -> None:
        if link.lost.done():
            raise DriverUnavailable(link.lost_reason, f"{self.endpoint}: connection closed")
        waiter = asyncio.get_running_loop().create_future()
        link.waiter = waiter
        try:
            await waiter
        finally:
            link.waiter = None
        if link.lost.done() and not link.buf:
            raise DriverUnavailable(link.lost_reason, f"{self.endpoint}: connection closed")

    async def _answer(self, link: _Link, request: Request | WriteRequest, serial: int) -> _Answer:
        head = self._header
        while True:
            buf = link.buf
            if len(buf) < head:
                if (
                    buf
                    and buf[0:2]
                    != (b"\xd0\x00" if self._frame == "3e" else b"\xd4\x00")[: len(buf)]
                ):
                    self._protocol_error("protocol error: wrong subheader", request)
                if link.lost.done():
                    raise DriverUnavailable(link.lost_reason, f"{self.endpoint}: connection closed")
                await self._wait(link)
                continue
            try:
                header = parse_answer_header(self._frame, buf)
            except CodecError as exc:
                self._protocol_error(str(exc), request)
            if header.length < 2 or header.length > max(request.data_length + 2, ERROR_ANSWER_MAX):
                self._protocol_error("protocol error: bad length", request)
            total = head + header.length
            if len(buf) < total:
                if link.lost.done():
                    raise DriverUnavailable(
                        link.lost_reason, f"{self.endpoint}: connection closed mid-frame"
                    )
                await self._wait(link)
                continue
            raw = bytes(buf[:total])
            del buf[:total]
            if self._frame == "4e" and header.serial != serial:
                if header.serial in self._stale:  # a late answer to a request we retried
                    self._stale.discard(header.serial)
                    continue
                self._protocol_error("protocol error: wrong serial number", request)
            if header.route != self._route:
                self._protocol_error("protocol error: wrong route", request)
            if buf and not self._stale:
                self._protocol_error("protocol error: unexpected data", request)
            (code,) = struct.unpack_from("<H", raw, head)
            data = raw[head + 2 :]
            if code == 0 and len(data) != request.data_length:
                self._protocol_error("protocol error: wrong data length", request)
            return _Answer(code, data if code == 0 else b"")

    def _protocol_error(self, reason: str, request: Request | WriteRequest) -> NoReturn:
        raise DriverUnavailable(reason, f"{self.endpoint}: answer to {request.describe()}")

    # ------------------------------------------------------------------ decoding

    def _fill(self, request: Request, answer: _Answer, out: _Columns) -> None:
        if answer.code != 0:
            _fill_bad(request.slots, answer.code, out)
            return
        data = answer.data
        values, bad = out.values, out.bad
        for slot in request.slots:
            value = slot.codec.decode(data)
            if isinstance(value, DecodeFailure):
                bad[slot.index] = RawReading(slot.tag, None, "bad", value.reason)
            else:
                values[slot.index] = value


def _fill_bad(slots: Sequence[TagSlot], code: int, out: _Columns) -> None:
    reason = end_code_reason(code)
    for slot in slots:
        out.bad[slot.index] = RawReading(slot.tag, None, "bad", reason, code)


def _clusters(request: Request) -> list[tuple[TagSlot, ...]]:
    """Slots grouped so that slots sharing words (bits) stay together, in number order."""
    ordered = sorted(request.slots, key=lambda s: (s.address.number, -s.words, s.index))
    out: list[list[TagSlot]] = []
    end = -1
    for slot in ordered:
        slot_end = slot.address.number + slot.words
        if out and slot.address.number < end:
            out[-1].append(slot)
            end = max(end, slot_end)
        else:
            out.append([slot])
            end = slot_end
    return [tuple(c) for c in out]


def _originals(request: Request, sub: Request) -> list[TagSlot]:
    indexes = {s.index for s in sub.slots}
    return [s for s in request.slots if s.index in indexes]


def _span(cluster: Sequence[TagSlot], series: Series) -> str:
    first = min(cluster, key=lambda s: s.address.number)
    return first.address.text(series)
