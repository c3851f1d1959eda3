"""XGT FEnet driver: the dedicated protocol on TCP 2004 over asyncio streams, no library.

One request at a time on one connection (a FEnet module answers in order). Each request
carries a new invoke id; the answer must echo it.

Fault behaviour (the table is in README.md):

- Every answer is checked before anything is decoded: company id, source 0x11, invoke id,
  BCC (0 accepted), the length in the header against the bytes that follow, command,
  data type, block count, the data size of every block, no trailing bytes, bit values
  0/1. A frame that does not fit fails the request at once with
  `DriverUnavailable("protocol error: …")`; the poller closes the connection and
  reconnects, so a late or stray frame can never be taken for the answer to a later one.
- A PLC silent for `timeout_s` gets the request again with a new invoke id, up to
  `retries` times (a late answer to an earlier attempt is known by its invoke id and
  skipped); then DriverUnavailable("timeout") closes the connection. An answer that
  starts but stops short is "protocol error: incomplete frame" at once.
- A NAK whose code concerns addresses (0x03 device not served, 0x04 beyond the device
  area, 0x21 variable not found, 0x22 address error) starts isolation: the request is
  split by tag (by variable for an individual read) to find the refused tags, which
  report bad quality with the code and its meaning; the rest keeps reporting through the
  good sub-requests, and the whole request is tried again every `isolation_retry_s`.
  Other NAK codes make every tag of the request bad with that code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog

from drivers.base import DriverError, DriverUnavailable, RawReading, Scalar, Value, WriteRefused
from drivers.xgt.codec import (
    DATA_TYPE,
    DT_CONTINUOUS,
    HEADER_LEN,
    SOURCE_RESPONSE,
    CodecError,
    DecodeFailure,
    FrameError,
    Header,
    ReadResponse,
    ValueSpec,
    continuous_read,
    continuous_write,
    decode_header,
    encode_frame,
    encode_value,
    error_reason,
    individual_read,
    individual_write,
    parse_read_response,
    parse_write_response,
)
from drivers.xgt.config import BIT_AREAS, CONTACT_AREAS, CPU_INFO, XgtDevice, XgtTag
from drivers.xgt.plan import (
    DevicePlan,
    GroupPlan,
    Request,
    TagSlot,
    clusters,
    plan_device,
    sub_request,
)

__all__ = ["ISOLATE_CODES", "XgtDriver", "check_answer", "check_header"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: NAK codes that concern the addresses of a request: splitting it tells the refused tags
#: from the good ones. Others concern the frame or the request as a whole.
ISOLATE_CODES: Final = frozenset({0x03, 0x04, 0x21, 0x22})

#: Largest answer a read can get: header + 10 + 16 x (2 + 2), or 12 + 1,400 bytes.
_MAX_BODY: Final = 1500


def check_header(header_bytes: bytes, invoke_id: int) -> Header:
    """Check the 20-byte header of an answer to the request sent with `invoke_id`, before
    its body is read: a foreign or stray frame is refused at once. Raises FrameError."""
    header = decode_header(header_bytes)
    if header.source != SOURCE_RESPONSE:
        raise FrameError(f"wrong source of frame 0x{header.source:02X}")
    if header.invoke_id != invoke_id & 0xFFFF:
        raise FrameError(f"wrong invoke id {header.invoke_id}, sent {invoke_id & 0xFFFF}")
    if not header.bcc_ok:
        raise FrameError("wrong BCC")
    if header.length > _MAX_BODY:
        raise FrameError(f"header length {header.length} is larger than any answer")
    return header


def check_answer(
    header_bytes: bytes, body: bytes, invoke_id: int, request: Request
) -> ReadResponse:
    """Check a whole answer (header and instruction) to `request` sent with `invoke_id`.

    Returns the parsed answer (the data, or a NAK's code). Raises FrameError with the
    first inconsistency; nothing of a frame that fails is ever decoded."""
    header = check_header(header_bytes, invoke_id)
    if header.length != len(body):
        raise FrameError(f"header length {header.length} but {len(body)} bytes follow")
    return parse_read_response(body, request.data_type, request.block_sizes)


@dataclass(slots=True)
class _Isolation:
    """A static request that the PLC refused whole, split into what works."""

    good: list[Request]
    bad: list[tuple[tuple[TagSlot, ...], int]]  # (cluster of slots, error code)
    retry_at: float


@dataclass(slots=True)
class _Columns:
    values: list[Value | None]
    bad: dict[int, RawReading]


class _Incomplete(Exception):
    """An answer started but did not finish within timeout_s."""


class _NotIsolable(Exception):
    def __init__(self, response: ReadResponse) -> None:
        super().__init__()
        self.response = response


def _code(response: ReadResponse) -> int | None:
    return response.error_code if response.error_status else None


class XgtDriver:
    """One XGT PLC over FEnet (implements drivers.base.Driver and ColumnReader).

    The request plan is made in the constructor (a config error raises ValueError before
    any socket is opened). `endpoint` overrides the configured host and port."""

    def __init__(
        self,
        device: XgtDevice,
        *,
        endpoint: tuple[str, int] | None = None,
        isolation_retry_s: float | None = None,
    ) -> None:
        self.device = device
        self.host, self.port = endpoint if endpoint is not None else (device.host, device.port)
        self.plan: DevicePlan = plan_device(device)
        self.isolation_retry_s = (
            device.isolation_retry_s if isolation_retry_s is None else isolation_retry_s
        )
        self._cpu_info = CPU_INFO[device.cpu]
        self._position = (device.fenet_base << 4) | device.fenet_slot
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._invoke = itertools.count(1)
        self._isolated: dict[tuple[str, int], _Isolation] = {}
        self._frames: dict[int, tuple[Request, bytes]] = {}
        self._status: str | None = None
        #: The header of the last answer (PLC info: CPU type, RUN/STOP), None before one.
        self.last_header: Header | None = None
        self.requests_sent = 0
        # One exchange at a time on the stream, whoever calls (answers are not multiplexed).
        self._lock = asyncio.Lock()
        # One write at a time (a read-modify-write holds it from the read to the write).
        self._write_lock = asyncio.Lock()
        self._tags = {t.name: t for t in device.tags}
        self._log = log.bind(device=device.name)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def group_plan(self, group: str) -> GroupPlan:
        """The static plan of `group`; a declared group with no tags reads nothing."""
        plan = self.plan.groups.get(group)
        if plan is None:
            if group in self.device.group_intervals():
                return GroupPlan(group, 0.0, (), ())
            raise ValueError(f"device {self.device.name!r} has no poll group {group!r}")
        return plan

    def active_requests(self, group: str) -> list[Request]:
        """The requests a poll of `group` makes now (isolated requests replaced by their
        good parts)."""
        out: list[Request] = []
        for number, request in enumerate(self.group_plan(group).requests):
            iso = self._isolated.get((group, number))
            out.extend(iso.good if iso is not None else (request,))
        return out

    async def connect(self) -> None:
        """Open the TCP connection. Raises DriverUnavailable ("connection refused" or
        "timeout")."""
        await self.close()
        try:
            async with asyncio.timeout(self.device.timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise DriverUnavailable(
                "timeout", f"{self.endpoint}: no connection within {self.device.timeout_s} s"
            ) from None
        except OSError as exc:
            raise DriverUnavailable("connection refused", f"{self.endpoint}: {exc}") from None
        self._reader, self._writer = reader, writer

    async def close(self) -> None:
        """Close the connection; never raises."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

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
        """`read` without an object per value: (tags, values, bad by index)."""
        plan = self.group_plan(group)
        values: list[Value | None] = [None] * len(plan.tags)
        out = _Columns(values, {})
        for number, request in enumerate(plan.requests):
            await self._read_block((group, number), request, out)
        if None in values:
            for i, (tag, value) in enumerate(zip(plan.tags, values, strict=True)):
                if value is None and i not in out.bad:
                    out.bad[i] = RawReading(tag, None, "bad", "not read")
        return plan.tags, values, out.bad

    # ------------------------------------------------------------------ isolation

    async def _read_block(self, key: tuple[str, int], request: Request, out: _Columns) -> None:
        now = asyncio.get_running_loop().time()
        iso = self._isolated.get(key)
        if iso is not None and now < iso.retry_at:
            for sub in iso.good:
                response = await self._execute(sub)
                if _code(response) in ISOLATE_CODES:
                    iso.retry_at = now
                self._fill(sub, response, out)
            for cluster, bad_code in iso.bad:
                _fill_bad(cluster, bad_code, out)
            return
        response = await self._execute(request)
        code = _code(response)
        if code is None or code not in ISOLATE_CODES:
            if iso is not None:
                if code is None:
                    del self._isolated[key]
                    self._log.info("xgt.block.recovered", block=request.describe())
                else:
                    iso.retry_at = now + self.isolation_retry_s
            self._fill(request, response, out)
            return
        try:
            good, bad = await self._isolate(request, response, out)
        except _NotIsolable as exc:
            self._fill(request, exc.response, out)
            return
        if iso is None or [c for c, _ in iso.bad] != [c for c, _ in bad]:
            self._log.warning(
                "xgt.block.isolated",
                block=request.describe(),
                bad_tags=[s.tag for cluster, _ in bad for s in cluster],
                reason=error_reason(bad[0][1] if bad else code),
                requests=[r.describe() for r in good],
                retry_s=self.isolation_retry_s,
            )
        self._isolated[key] = _Isolation(good, bad, now + self.isolation_retry_s)

    async def _isolate(
        self, request: Request, response: ReadResponse, out: _Columns
    ) -> tuple[list[Request], list[tuple[tuple[TagSlot, ...], int]]]:
        """Bisect `request` by clusters to find the refused tags; then try each run of good
        parts between two refused clusters (every good variable, for an individual read) as
        one request. Fills `out` for this poll."""
        found: list[tuple[Request | None, ReadResponse | None, tuple[TagSlot, ...], int]] = []

        async def split(group: list[tuple[TagSlot, ...]], code: int) -> None:
            if len(group) == 1:
                found.append((None, None, group[0], code))
                return
            mid = len(group) // 2
            for half in (group[:mid], group[mid:]):
                sub = sub_request(request, [s for c in half for s in c])
                answer = await self._execute(sub)
                sub_code = _code(answer)
                if sub_code is None:
                    found.append((sub, answer, (), 0))
                elif sub_code in ISOLATE_CODES:
                    await split(half, sub_code)
                else:
                    raise _NotIsolable(answer)

        first = _code(response)
        assert first is not None
        await split(clusters(request), first)

        good: list[Request] = []
        bad: list[tuple[tuple[TagSlot, ...], int]] = []
        run: list[tuple[Request, ReadResponse]] = []

        async def close_run() -> None:
            if len(run) > 1:
                indexes = {s.index for r, _ in run for s in r.slots}
                whole = sub_request(request, [s for s in request.slots if s.index in indexes])
                answer = await self._execute(whole)
                if _code(answer) is None:
                    run[:] = [(whole, answer)]
            for sub, answer in run:
                good.append(sub)
                self._fill(sub, answer, out)
            run.clear()

        for sub, answer, cluster, code in found:
            if sub is not None and answer is not None:
                run.append((sub, answer))
                continue
            if request.kind == "continuous":  # variables of an individual read need no run
                await close_run()
            bad.append((cluster, code))
            _fill_bad(cluster, code, out)
        await close_run()
        return good, bad

    # ------------------------------------------------------------------ wire

    def _instruction(self, request: Request) -> bytes:
        cached = self._frames.get(id(request))
        if cached is not None and cached[0] is request:
            return cached[1]
        if request.kind == "continuous":
            body = continuous_read(request.start_variable, request.count)
        else:
            body = individual_read(request.variables, request.size)
        if len(self._frames) >= 4096:
            self._frames.clear()
        self._frames[id(request)] = (request, body)
        return body

    async def _execute(self, request: Request) -> ReadResponse:
        """Send `request`, wait for its answer and check it (see check_answer)."""

        def parse(head: bytes, body: bytes, invoke_id: int) -> ReadResponse:
            return check_answer(head, body, invoke_id, request)

        return await self._locked(self._instruction(request), request.describe(), parse)

    async def _locked(
        self, instruction: bytes, what: str, parse: Callable[[bytes, bytes, int], T]
    ) -> T:
        async with self._lock:
            try:
                return await self._exchange(instruction, what, parse)
            except asyncio.CancelledError:
                # Cancelled mid-exchange: the answer may still come and would be read as
                # the answer to the next request. Drop the connection (the poller
                # reconnects) and let the cancellation go on.
                self._drop()
                raise

    def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    async def _exchange(
        self, instruction: bytes, what: str, parse: Callable[[bytes, bytes, int], T]
    ) -> T:
        """Send `instruction` and return its answer as checked by `parse(header bytes,
        body, invoke id)`, resending it (new invoke id) up to `retries` times when the PLC
        stays silent for `timeout_s`. A late answer to an earlier attempt is recognised
        by its invoke id and skipped."""
        reader, writer = self._reader, self._writer
        if reader is None or writer is None or writer.is_closing():
            raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
        attempts = self.device.retries + 1
        earlier: set[int] = set()
        try:
            for attempt in range(1, attempts + 1):
                invoke_id = next(self._invoke) & 0xFFFF
                frame = encode_frame(
                    instruction,
                    invoke_id=invoke_id,
                    cpu_info=self._cpu_info,
                    position=self._position,
                )
                self.requests_sent += 1
                answer = await self._attempt(reader, writer, frame, invoke_id, earlier)
                if answer is not None:
                    header, head, body = answer
                    response = parse(head, body, invoke_id)
                    self._note_status(header)
                    return response
                earlier.add(invoke_id)
                if attempt < attempts:
                    self._log.debug("xgt.request.retry", block=what, attempt=attempt)
            await self.close()
            raise DriverUnavailable(
                "timeout",
                f"{self.endpoint}: no answer to {what} within "
                f"{self.device.timeout_s} s x {attempts}",
            )
        except _Incomplete:
            await self.close()
            raise DriverUnavailable(
                "protocol error: incomplete frame",
                f"{self.endpoint}: answer to {what} stopped short",
            ) from None
        except asyncio.IncompleteReadError as exc:
            await self.close()
            reason = "protocol error: incomplete frame" if exc.partial else "connection lost"
            raise DriverUnavailable(reason, f"{self.endpoint}: connection closed") from None
        except FrameError as exc:
            await self.close()
            raise DriverUnavailable(
                f"protocol error: {exc}", f"{self.endpoint}: answer to {what}"
            ) from None
        except OSError as exc:
            await self.close()
            raise DriverUnavailable("connection lost", f"{self.endpoint}: {exc}") from None

    # ------------------------------------------------------------------ writes

    async def write(self, tag: str, raw: Scalar) -> None:
        """Write tag `tag` with raw value `raw` (drivers.base.WritingDriver).

        A bool tag (%MX…) and a `bit` tag in an area with bit access: an individual
        write of that one bit (data type X). A `bit` tag where the CPU has no bit access
        to the area (or in a timer/counter's current value): read-modify-write — a
        continuous read of the tag's bytes, then a continuous write of them with the bit
        changed, under this driver's write lock. Every other value: one continuous write
        (data type 0x14) of its bytes at its byte offset, little-endian as XGT memory is.

        Raises WriteRefused (an area the driver does not write, a value the type cannot
        hold: nothing sent), DriverError("xgt error 0x…") on a NAK, DriverUnavailable
        when the outcome is unknown (timeout, connection lost, an answer that does not
        fit)."""
        config = self._tags.get(tag)
        if config is None:
            raise WriteRefused("unknown tag", f"no tag {tag!r} on device {self.device.name!r}")
        refusal = self.device.write_refusal(tag)
        if refusal is not None:
            raise WriteRefused("not writable", f"{tag}: {refusal}")
        addr = config.parsed()
        kind = config.resolved_type()
        try:
            data = _encode_raw(config, raw)
        except CodecError as exc:
            raise WriteRefused("value does not fit", f"{tag} ({kind}): {exc}") from None
        async with self._write_lock:
            if kind in ("bool", "bit"):
                bit = addr.offset if kind == "bool" else addr.byte_offset * 8 + (config.bit or 0)
                has_bits = addr.area in BIT_AREAS[self.device.cpu]
                if kind == "bool" or (has_bits and addr.area not in CONTACT_AREAS):
                    name = f"%{addr.area}X{bit}"
                    await self._write(
                        individual_write([(name, b"\x01" if raw else b"\x00")], "X"),
                        DATA_TYPE["X"],
                        f"bit write {name}",
                    )
                    return
                data = await self._modify_bit(config, bool(raw))
            start = f"%{addr.area}B{addr.byte_offset}"
            await self._write(
                continuous_write(start, data),
                DT_CONTINUOUS,
                f"continuous write {start} x {len(data)} byte{'' if len(data) == 1 else 's'}",
            )

    async def _modify_bit(self, config: XgtTag, value: bool) -> bytes:
        """The bytes of a `bit` tag read now, with its bit set to `value`."""
        addr = config.parsed()
        count = config.byte_count()
        start = f"%{addr.area}B{addr.byte_offset}"
        what = f"continuous read {start} x {count} bytes (read-modify-write of {config.name})"

        def parse(head: bytes, body: bytes, invoke_id: int) -> ReadResponse:
            header = check_header(head, invoke_id)
            if header.length != len(body):
                raise FrameError(f"header length {header.length} but {len(body)} bytes follow")
            return parse_read_response(body, DT_CONTINUOUS, (count,))

        response = await self._locked(continuous_read(start, count), what, parse)
        code = _code(response)
        if code is not None:
            raise DriverError(error_reason(code), f"{self.endpoint}: {what}", code)
        current = bytearray(response.blocks[0])
        bit = config.bit or 0
        mask = 1 << (bit % 8)
        current[bit // 8] = current[bit // 8] | mask if value else current[bit // 8] & ~mask
        return bytes(current)

    async def _write(self, instruction: bytes, data_type: int, what: str) -> None:
        def parse(head: bytes, body: bytes, invoke_id: int) -> int | None:
            header = check_header(head, invoke_id)
            if header.length != len(body):
                raise FrameError(f"header length {header.length} but {len(body)} bytes follow")
            return parse_write_response(body, data_type, 1)

        code = await self._locked(instruction, what, parse)
        if code is not None:
            reason = error_reason(code)
            self._log.warning("xgt.write.refused", request=what, reason=reason)
            raise DriverError(reason, f"{self.endpoint}: {what}", code)

    async def _attempt(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frame: bytes,
        invoke_id: int,
        earlier: set[int],
    ) -> tuple[Header, bytes, bytes] | None:
        """Send `frame` and read its answer within timeout_s: (header, header bytes, body),
        or None when not one byte of an answer came (the caller may resend). Answers to
        `earlier` attempts are read whole and dropped. Raises _Incomplete when an answer
        stops short, FrameError for one that does not fit."""
        started = False
        try:
            async with asyncio.timeout(self.device.timeout_s):
                writer.write(frame)
                await writer.drain()
                while True:
                    first = await reader.readexactly(1)
                    started = True
                    head = first + await reader.readexactly(HEADER_LEN - 1)
                    header = decode_header(head)
                    if header.invoke_id in earlier and header.invoke_id != invoke_id:
                        check_header(head, header.invoke_id)  # a valid frame, only late
                        await reader.readexactly(header.length)
                        started = False
                        continue
                    header = check_header(head, invoke_id)
                    body = await reader.readexactly(header.length)
                    return header, head, body
        except TimeoutError:
            if started:
                raise _Incomplete from None
            return None

    def _note_status(self, header: Header) -> None:
        self.last_header = header
        status = header.system_status + (" with CPU error" if header.cpu_error else "")
        if status != self._status:
            if self._status is not None or status != "RUN":
                # RUN is the normal state; STOP/ERROR/DEBUG means the values stand still.
                emit = self._log.info if status == "RUN" else self._log.warning
                emit("xgt.cpu.status", status=status, previous=self._status)
            self._status = status

    def _fill(self, request: Request, response: ReadResponse, out: _Columns) -> None:
        code = _code(response)
        if code is not None:
            _fill_bad(request.slots, code, out)
            return
        data = b"".join(response.blocks)
        try:
            values = request.decoder.decode(data)
        except CodecError as exc:  # check_answer makes this unreachable; never a value
            for slot in request.slots:
                out.bad[slot.index] = RawReading(slot.tag, None, "bad", f"short data: {exc}")
            return
        for slot, value in zip(request.slots, values, strict=True):
            if isinstance(value, DecodeFailure):
                out.bad[slot.index] = RawReading(slot.tag, None, "bad", value.reason)
            else:
                out.values[slot.index] = value


def _fill_bad(slots: Sequence[TagSlot], code: int, out: _Columns) -> None:
    reason = error_reason(code)
    for slot in slots:
        out.bad[slot.index] = RawReading(slot.tag, None, "bad", reason, code)


def _encode_raw(tag: XgtTag, raw: Scalar) -> bytes:
    """The bytes a write of `raw` to `tag` stores (bool/bit: checked, b"" — the bit is
    set by the caller). Raises CodecError for a value the tag's type cannot hold."""
    kind = tag.resolved_type()
    if kind in ("bool", "bit"):
        if not isinstance(raw, bool):
            raise CodecError(f"type {kind} needs true or false, got {raw!r}")
        return b""
    if kind == "string":
        if not isinstance(raw, str):
            raise CodecError(f"type string needs a string, got {raw!r}")
    elif isinstance(raw, bool) or not isinstance(raw, int | float):
        raise CodecError(f"type {kind} needs a number, got {raw!r}")
    elif kind in ("float32", "float64"):
        if not math.isfinite(raw):
            raise CodecError(f"{raw!r} is not a finite number")
    elif not isinstance(raw, int):
        raise CodecError(f"type {kind} needs an integer, got {raw!r}")
    return encode_value(ValueSpec(kind, length=tag.length or 0), raw)
