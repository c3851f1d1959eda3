"""Modbus driver: block reads planned once, decoded with our codec; writes of one tag
(functions 5/6/15/16/22, planned in `drivers.modbus.write`, encoded with the same codec).

A device with `host` has its own Modbus/TCP connection (`drivers.modbus.tcp`: MBAP
framing on an asyncio Protocol, every frame checked by `check_frame`). A
device with `link` is one unit on a shared `drivers.links.Link` (a serial line, a
serial device server carrying RTU over TCP, or a Modbus/TCP gateway): its requests are
framed here (RTU: `drivers.modbus.rtu`; TCP gateway: MBAP, checked by `check_frame`)
and sent through the link, which serialises them with the line's timing. On a link a
malformed answer (CRC error, garbage, a partial frame) fails only the tags of that
block, with the reason, after the link resynchronised and retried `retries` times; a
unit that does not answer raises DriverUnavailable("timeout") and is suspended by the
link, so it costs the other units on the line at most its timeout.

No protocol library is used for reading: pymodbus' client spent most of the agent's
Modbus CPU (bench/README.md, "CPU per million values"), and its TCP client never
reconnected on its own here anyway (`reconnect_delay=0`). Ownership of reconnection:
the agent's poller; a connection is never reopened behind its back.

Fault behaviour (the table is in README.md):

- Every received frame is checked against the request it answers before it is
  decoded (`check_frame`, in `MbapConnection.data_received`). pymodbus skipped a
  frame with a wrong transaction or unit id and waits for its timeout, and decodes a
  frame with the wrong function code or a byte count that does not match the request
  into a response object: neither may become a value. A frame that does not fit fails
  the request at once with `DriverUnavailable("protocol error: …")`; the poller closes
  the connection and reconnects, so the stream is resynchronised and a late or stray
  frame can never be taken for the answer to a later request.
- A timeout also raises DriverUnavailable ("timeout"): the connection is closed, so a
  late answer cannot be paired with the next request.
- An exception response 2 (illegal data address) or 3 (illegal data value) to a merged
  block read starts block isolation (`_isolate`): the block is split by tag boundaries
  to find the tags the device refuses; the rest keeps reporting through the good
  sub-requests, and the whole block is tried again every `isolation_retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import structlog

from drivers.base import DriverError, DriverUnavailable, RawReading, Scalar, Value, WriteRefused
from drivers.links import Link, LinkError
from drivers.modbus import rtu
from drivers.modbus.codec import CodecError, DecodeFailure
from drivers.modbus.config import ModbusDevice
from drivers.modbus.plan import (
    DevicePlan,
    GroupPlan,
    Request,
    TagSlot,
    clusters,
    plan_device,
    sub_request,
)
from drivers.modbus.tcp import MbapConnection, MbapError
from drivers.modbus.write import WRITE_FUNCTIONS, WriteOp, echo_size, merge_bit, plan_write

__all__ = [
    "EXCEPTION_NAMES",
    "FRAME_INCOMPLETE",
    "FRAME_OK",
    "ISOLATE_CODES",
    "ISOLATION_RETRY_S",
    "ModbusDriver",
    "check_frame",
    "exception_reason",
    "mbap_read_request",
    "mbap_request",
    "parse_mbap_answer",
]

log = structlog.get_logger(__name__)

EXCEPTION_NAMES: Final[dict[int, str]] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

# Exception codes that concern the addresses or the size of a request: splitting the
# request can tell the refused tags from the good ones. Others (busy, device failure,
# gateway errors, illegal function) concern the device or the table as a whole.
ISOLATE_CODES: Final = frozenset({2, 3})

# How often an isolated block is read whole again to see whether the device accepts it
# (a PLC program download may have added the missing registers). One request per block
# per minute is negligible next to the polls; an operator who fixed the PLC sees the
# values within a minute.
ISOLATION_RETRY_S: Final = 60.0

FRAME_OK: Final = ""
FRAME_INCOMPLETE: Final = "incomplete"

_MBAP = 7  # transaction id (2), protocol id (2), length (2), unit id (1)


def exception_reason(code: int) -> str:
    """`modbus exception 2 (illegal data address)`: the reason of a bad reading."""
    return f"modbus exception {code} ({EXCEPTION_NAMES.get(code, 'unknown exception')})"


def check_frame(data: bytes, request: bytes) -> str:
    """Check received bytes `data` against the Modbus/TCP `request` they answer (a read,
    or a write, whose answer must echo the request's address and value or quantity).

    Returns FRAME_OK when `data` is exactly one complete, consistent answer (values or
    an exception response), FRAME_INCOMPLETE when more bytes are needed, or the reason
    of the first inconsistency (`protocol error: wrong transaction id`, `… wrong
    protocol id`, `… bad length`, `… wrong unit id`, `… wrong function code`,
    `… wrong byte count`, `… wrong length`, `… wrong echo`, `… unexpected data`). Checks run on
    partial data too, so a wrong header is reported as soon as it arrives.
    """
    n = len(data)
    if n >= 2 and data[0:2] != request[0:2]:
        return "protocol error: wrong transaction id"
    if n >= 4 and data[2:4] != b"\x00\x00":
        return "protocol error: wrong protocol id"
    if n < 6:
        return FRAME_INCOMPLETE
    length = int.from_bytes(data[4:6], "big")
    if not 3 <= length <= 254:  # unit + function + at least one byte; a PDU is ≤ 253
        return "protocol error: bad length"
    # Unit 0 addresses "the device itself" on TCP; devices answer it with their own id.
    if n >= 7 and request[6] != 0 and data[6] != request[6]:
        return "protocol error: wrong unit id"
    if n >= 8 and data[7] & 0x7F != request[7]:
        return "protocol error: wrong function code"
    total = 6 + length
    if n < total:
        return FRAME_INCOMPLETE
    if n > total:
        return "protocol error: unexpected data"
    if data[7] & 0x80:
        return FRAME_OK if length == 3 else "protocol error: wrong length"
    if request[7] in WRITE_FUNCTIONS:  # the answer echoes the request
        echo = echo_size(request[7])
        if length != 2 + echo:
            return "protocol error: wrong length"
        if data[8 : 8 + echo] != request[8 : 8 + echo]:
            return "protocol error: wrong echo"
        return FRAME_OK
    count = int.from_bytes(request[10:12], "big")
    expected = 2 * count if request[7] in (3, 4) else (count + 7) // 8
    if data[8] != expected:
        return "protocol error: wrong byte count"
    if length != 3 + expected:
        return "protocol error: wrong length"
    return FRAME_OK


@dataclass(slots=True)
class _Isolation:
    """A static request that the device refused whole, split into what works."""

    good: list[Request]
    bad: list[tuple[tuple[TagSlot, ...], int]]  # (cluster of slots, exception code)
    retry_at: float


class _NotIsolable(Exception):
    """An isolation probe got an exception that splitting cannot explain."""

    def __init__(self, response: Any) -> None:
        super().__init__()
        self.response = response


def _code(response: Any) -> int | None:
    """The exception code of an exception response, None for a normal response."""
    if response is None or response.isError():
        return int(getattr(response, "exception_code", 0) or 0)
    return None


def _span(request: Request, cluster: Sequence[TagSlot]) -> str:
    first = request.start + min(s.offset for s in cluster)
    last = request.start + max(s.offset + s.spec.register_count for s in cluster) - 1
    return f"{request.table} {first}" if first == last else f"{request.table} {first}..{last}"


class ModbusDriver:
    """One Modbus/TCP device (implements drivers.base.Driver).

    The request plan is made in the constructor (a config error raises ValueError before
    any socket is opened). `endpoint` overrides the configured host and port, e.g. with
    the address a ModbusSimulator actually listens on. `isolation_retry_s` is how often
    an isolated block is read whole again (default: the device's isolation_retry_s).
    """

    def __init__(
        self,
        device: ModbusDevice,
        *,
        endpoint: tuple[str, int] | None = None,
        isolation_retry_s: float | None = None,
        link: Link | None = None,
    ) -> None:
        self.device = device
        if device.link is not None and link is None:
            raise ValueError(
                f"device {device.name!r} is on link {device.link!r}: pass the shared Link"
            )
        if link is not None and device.transport is not None:
            expected = {"serial": "rtu", "rtu_over_tcp": "rtu_over_tcp", "tcp": "tcp"}
            if expected[link.config.type] != device.transport:
                raise ValueError(
                    f"device {device.name!r}: transport {device.transport} does not match "
                    f"link {link.name!r} of type {link.config.type}"
                )
        self.link = link
        self._acquired = False
        host = device.host or ""
        self.host, self.port = endpoint if endpoint is not None else (host, device.port)
        self.plan: DevicePlan = plan_device(device)
        self.isolation_retry_s = (
            device.isolation_retry_s if isolation_retry_s is None else isolation_retry_s
        )
        self._conn: MbapConnection | None = None
        self._tid = 0
        # Kept across reconnects: a refused address stays refused until the retry.
        self._isolated: dict[tuple[str, int], _Isolation] = {}
        # id(request) → (request, tag index per slot); the request keeps its id unique.
        self._slot_indices: dict[int, tuple[Request, list[int]]] = {}
        self._requests_in_poll = 0
        self._tags = {t.name: t for t in device.tags}
        self._io_lock = asyncio.Lock()  # one request at a time on the own connection
        self._write_lock = asyncio.Lock()  # one write (a read-modify-write) at a time
        self._log = log.bind(device=device.name)

    @property
    def endpoint(self) -> str:
        """`host:port` (or `link NAME unit N`) for logs and error details."""
        if self.link is not None:
            return f"link {self.link.name} unit {self.device.unit_id}"
        return f"{self.host}:{self.port}"

    def group_plan(self, group: str) -> GroupPlan:
        """The static plan of `group`; a group with no tags reads nothing."""
        plan = self.plan.groups.get(group)
        if plan is None:
            if group in self.device.group_intervals():
                return GroupPlan(group=group, interval_s=0.0, tags=(), requests=())
            raise ValueError(f"device {self.device.name!r} has no poll group {group!r}")
        return plan

    def active_requests(self, group: str) -> list[Request]:
        """The requests a poll of `group` makes now: the static plan, with every isolated
        block replaced by its good sub-requests (refused tags are not read until the
        retry)."""
        out: list[Request] = []
        for number, request in enumerate(self.group_plan(group).requests):
            iso = self._isolated.get((group, number))
            out.extend(iso.good if iso is not None else (request,))
        return out

    async def connect(self) -> None:
        """Open the TCP connection. Raises DriverUnavailable ("connection refused" or
        "timeout"). On a link: borrow the link (opened on first use; "port unavailable"
        when the serial port cannot be opened)."""
        await self.close()
        if self.link is not None:
            try:
                await self.link.acquire()
            except LinkError as exc:
                raise DriverUnavailable(exc.reason, f"{self.endpoint}: {exc.detail}") from None
            self._acquired = True
            return
        try:
            self._conn = await MbapConnection.open(
                self.host, self.port, self.device.timeout_s, check_frame
            )
        except TimeoutError:
            raise DriverUnavailable(
                "timeout", f"{self.endpoint}: no answer within {self.device.timeout_s} s"
            ) from None
        except ConnectionRefusedError:
            raise DriverUnavailable("connection refused", self.endpoint) from None
        except OSError as exc:
            raise DriverUnavailable(
                "connection refused", f"{self.endpoint}: {exc.strerror or exc}"
            ) from None

    async def read(self, group: str) -> list[RawReading]:
        """One poll of `group`: one RawReading per tag of the group, in config order.

        Raw decoded values (not scaled), ts_source None. An exception response fails only
        the tags it concerns (after isolation, see the module docstring); a timeout, a
        lost connection or a malformed frame raises DriverUnavailable.
        """
        tags, values, bad = await self.read_columns(group)
        return [
            bad[i] if i in bad else RawReading(tag, value)
            for i, (tag, value) in enumerate(zip(tags, values, strict=True))
        ]

    async def read_columns(
        self, group: str
    ) -> tuple[Sequence[str], list[Value | None], dict[int, RawReading]]:
        """`read` without an object per value: (tags, values, bad), where `values[i]` is
        the raw value of `tags[i]` unless `i` is in `bad`, which holds that tag's bad
        reading (its value is None). The poller's fast path; same errors as `read`."""
        plan = self.group_plan(group)
        tags = plan.tags
        values: list[Value | None] = [None] * len(tags)
        bad: dict[int, RawReading] = {}
        out = _Columns(values, bad)
        self._requests_in_poll = 0
        for number, request in enumerate(plan.requests):
            await self._read_block((group, number), request, out)
        # A good value is never None: a None not in `bad` is a tag no request covered.
        if None in values:
            for i, (tag, value) in enumerate(zip(tags, values, strict=True)):
                if value is None and i not in bad:
                    bad[i] = RawReading(tag, None, "bad", "not read")
        return tags, values, bad

    async def close(self) -> None:
        """Close the connection; never raises."""
        if self._acquired and self.link is not None:
            self._acquired = False
            with contextlib.suppress(Exception):
                await self.link.release()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ isolation

    async def _read_block(self, key: tuple[str, int], request: Request, out: _Columns) -> None:
        """Read one static request, or its isolated parts until the next retry."""
        now = asyncio.get_running_loop().time()
        iso = self._isolated.get(key)
        if iso is not None and now < iso.retry_at:
            for sub in iso.good:
                response = await self._request(sub)
                if _code(response) in ISOLATE_CODES:
                    iso.retry_at = now  # the device changed again: re-isolate next poll
                self._fill(sub, response, out)
            for cluster, bad_code in iso.bad:
                _fill_bad(cluster, bad_code, out)
            return
        response = await self._request(request)
        code = _code(response)
        if code is None or code not in ISOLATE_CODES:
            if iso is not None:
                if code is None:
                    del self._isolated[key]
                    self._log.info("modbus.block.recovered", block=request.describe())
                else:  # busy, device failure…: keep the isolation, try again later
                    iso.retry_at = now + self.isolation_retry_s
            self._fill(request, response, out)
            return
        try:
            good, bad = await self._isolate(request, response, out)
        except _NotIsolable as exc:
            self._fill(request, exc.response, out)
            return
        if iso is None or _bad_spans(request, iso.bad) != _bad_spans(request, bad):
            self._log.warning(
                "modbus.block.isolated",
                block=request.describe(),
                bad=_bad_spans(request, bad),
                bad_tags=[s.tag for cluster, _ in bad for s in cluster],
                reason=exception_reason(bad[0][1] if bad else code),
                requests=[r.describe() for r in good],
                retry_s=self.isolation_retry_s,
            )
        self._isolated[key] = _Isolation(good, bad, now + self.isolation_retry_s)

    async def _isolate(
        self, request: Request, response: Any, out: _Columns
    ) -> tuple[list[Request], list[tuple[tuple[TagSlot, ...], int]]]:
        """Split `request` (refused with `response`) to find the refused tags.

        Bisects the request's clusters (tags that share registers stay together): a
        half the device accepts is kept, a refused half is split again, a refused single
        cluster is bad. Then every run of good parts between two bad clusters is tried
        as one request and kept whole if the device accepts it, so a poll makes as few
        requests as the refused addresses allow. Fills `out` for this poll.
        """
        parts = clusters(request)
        # In address order: (request, response, 0) for a good part, (None, cluster, code)
        # for a refused one.
        found: list[tuple[Request | None, Any, int]] = []

        async def split(group: list[tuple[TagSlot, ...]], code: int) -> None:
            if len(group) == 1:
                found.append((None, group[0], code))
                return
            mid = len(group) // 2
            for half in (group[:mid], group[mid:]):
                sub = sub_request(request, [s for c in half for s in c])
                answer = await self._request(sub)
                sub_code = _code(answer)
                if sub_code is None:
                    found.append((sub, answer, 0))
                elif sub_code in ISOLATE_CODES:
                    await split(half, sub_code)
                else:
                    raise _NotIsolable(answer)

        first = _code(response)
        assert first is not None
        await split(parts, first)

        good: list[Request] = []
        bad: list[tuple[tuple[TagSlot, ...], int]] = []
        run: list[tuple[Request, Any]] = []

        async def close_run() -> None:
            if len(run) > 1:
                # Sub-request slots are relative to their own start: take the originals.
                indexes = {s.index for r, _ in run for s in r.slots}
                whole = sub_request(request, [s for s in request.slots if s.index in indexes])
                answer = await self._request(whole)
                if _code(answer) is None:
                    run[:] = [(whole, answer)]
            for sub, answer in run:
                good.append(sub)
                self._fill(sub, answer, out)
            run.clear()

        for sub, payload, code in found:
            if sub is not None:
                run.append((sub, payload))
                continue
            await close_run()
            cluster: tuple[TagSlot, ...] = payload
            bad.append((cluster, code))
            _fill_bad(cluster, code, out)
        await close_run()
        return good, bad

    # ------------------------------------------------------------------ internals

    async def _request(self, request: Request) -> Any:
        """One request of this poll, with the device's pause between requests."""
        pause = self.device.request_pause_s
        if self._requests_in_poll and pause > 0:
            await asyncio.sleep(pause)
        self._requests_in_poll += 1
        return await self._execute(request)

    async def _execute(self, request: Request) -> Any:
        if self.link is not None:
            return await self._execute_on_link(self.link, request)
        self._tid = tid = (self._tid + 1) & 0xFFFF
        frame = mbap_read_request(
            tid, self.device.unit_id, request.function_code, request.start, request.count
        )
        answer = await self._transact_tcp(frame, request.describe())
        if answer[7] & 0x80:
            return _Answer(request.function_code, [], exception_code=answer[8])
        return _Answer(request.function_code, [], payload=answer[9:])

    async def _transact_tcp(self, frame: bytes, what: str) -> bytes:
        """One request over the device's own connection (`what` names it in errors): the
        checked answer frame. One request at a time (a poll and a write may run at once;
        MbapConnection checks each answer against the one request in flight)."""
        async with self._io_lock:
            conn = self._conn
            if conn is None:
                raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
            try:
                return await conn.transact(frame, self.device.timeout_s, self.device.retries)
            except MbapError as exc:
                raise self._unavailable(exc, what) from None

    def _unavailable(self, exc: MbapError, what: str) -> DriverUnavailable:
        if exc.kind == "frame":
            return DriverUnavailable(exc.reason, f"{self.endpoint}: answer to {what}")
        if exc.kind == "stray":
            return DriverUnavailable(exc.reason, f"{self.endpoint}: stray data")
        if exc.kind == "incomplete":
            return DriverUnavailable(
                "protocol error: incomplete frame",
                f"{self.endpoint}: answer to {what} stopped short",
            )
        if exc.kind == "timeout":
            return DriverUnavailable(
                "timeout",
                f"{self.endpoint}: no answer to {what} within "
                f"{self.device.timeout_s} s x {self.device.retries + 1}",
            )
        return DriverUnavailable(
            "connection lost", f"{self.endpoint}: {exc.reason or 'connection closed'}"
        )

    # ------------------------------------------------------------------ writes

    async def write(self, tag: str, raw: Scalar) -> None:
        """Write tag `tag` with its raw value `raw` (drivers.base.WritingDriver).

        Coils: function 5 (15 with `write_functions: multiple`); one holding register:
        6 (16); several registers: 16, in one request; a `bit` tag: 22 (mask write), or
        with `bit_write: read_modify_write` 3 then 6 (16), both under this driver's write
        lock. Raises WriteRefused (read-only table, a value the type cannot hold: nothing
        sent), DriverError("modbus exception N (…)") when the device refuses the write,
        DriverUnavailable when the outcome is unknown (timeout, connection lost, an
        answer that is not the echo of the request)."""
        config = self._tags.get(tag)
        if config is None:
            raise WriteRefused("unknown tag", f"no tag {tag!r} on device {self.device.name!r}")
        refusal = self.device.write_refusal(tag)
        if refusal is not None:
            raise WriteRefused("not writable", f"{tag}: {refusal}")
        device = self.device
        try:
            op = plan_write(
                config,
                raw,
                device_byte_order=device.byte_order,
                write_functions=device.write_functions,
                bit_write=device.bit_write,
            )
        except CodecError as exc:
            raise WriteRefused("value does not fit", f"{tag} ({config.type}): {exc}") from None
        async with self._write_lock:
            try:
                if op is None:  # read-modify-write of a bit inside a holding register
                    current = await self._read_register(config.resolved_address())
                    op = merge_bit(config, raw, current, device.write_functions)
                await self._send_write(op)
            except DriverUnavailable as exc:
                self._abandon(tag, exc)
                raise

    def _abandon(self, tag: str, exc: DriverUnavailable) -> None:
        """A write whose outcome is unknown: on the device's own connection, close it, so
        a late answer can never be paired with a later request (the next poll reports
        the lost connection and the poller reconnects). A shared link resynchronises by
        itself (silence on a serial line, transaction ids on a gateway)."""
        self._log.warning("modbus.write.unknown_outcome", tag=tag, reason=exc.reason)
        conn = self._conn
        if conn is not None:
            conn.close()

    async def _read_register(self, address: int) -> int:
        """One holding register (function 3), for a read-modify-write."""
        what = f"function 3 (read holding registers) at holding {address}, 1 register"
        unit = self.device.unit_id
        if self.link is not None:
            answer = await self._transact_on_link(self.link, 3, address, 1, None, what)
            code, words = answer
        else:
            self._tid = tid = (self._tid + 1) & 0xFFFF
            frame = mbap_read_request(tid, unit, 3, address, 1)
            code, words = parse_mbap_answer(await self._transact_tcp(frame, what), frame)
        if code is not None:
            raise DriverError(exception_reason(code), f"{self.endpoint}: {what}", code)
        if len(words) != 1:
            raise DriverUnavailable(
                "protocol error: wrong byte count", f"{self.endpoint}: {len(words)} registers"
            )
        return int(words[0])

    async def _send_write(self, op: WriteOp) -> None:
        what = op.describe()
        unit = self.device.unit_id
        if self.link is not None:
            code, _ = await self._transact_on_link(self.link, op.function_code, 0, 0, op, what)
        else:
            self._tid = tid = (self._tid + 1) & 0xFFFF
            frame = mbap_request(tid, unit, op.pdu())
            code, _ = parse_mbap_answer(await self._transact_tcp(frame, what), frame)
        if code is not None:
            self._log.warning("modbus.write.refused", op=what, reason=exception_reason(code))
            raise DriverError(exception_reason(code), f"{self.endpoint}: {what}", code)

    async def _transact_on_link(
        self, link: Link, fc: int, start: int, count: int, op: WriteOp | None, what: str
    ) -> tuple[int | None, list[int]]:
        """One request of a write through the shared link: (exception code, registers).
        A malformed answer (after the link's retries) leaves the outcome unknown."""
        if not self._acquired:
            raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
        unit = self.device.unit_id
        check: Callable[[bytes, bytes], str]
        if link.is_serial:
            frame = (
                rtu.write_request(unit, op.pdu())
                if op
                else rtu.read_request(unit, fc, start, count)
            )
            check = rtu.check_rtu_frame
        else:
            tid = link.next_tid()
            frame = (
                mbap_request(tid, unit, op.pdu())
                if op
                else mbap_read_request(tid, unit, fc, start, count)
            )
            check = check_frame
        try:
            answer = await link.transact(
                unit, frame, check, self.device.timeout_s, retries=self.device.retries
            )
        except LinkError as exc:
            raise DriverUnavailable(exc.reason, f"{self.endpoint}: {what}: {exc.detail}") from None
        if link.is_serial:
            return rtu.parse_answer(answer, frame)
        return parse_mbap_answer(answer, frame)

    async def _execute_on_link(self, link: Link, request: Request) -> Any:
        if not self._acquired:
            raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
        unit = self.device.unit_id
        fc = request.function_code
        check: Callable[[bytes, bytes], str]
        if link.is_serial:
            frame = rtu.read_request(unit, fc, request.start, request.count)
            check = rtu.check_rtu_frame
        else:
            frame = mbap_read_request(link.next_tid(), unit, fc, request.start, request.count)
            check = check_frame
        try:
            answer = await link.transact(
                unit, frame, check, self.device.timeout_s, retries=self.device.retries
            )
        except LinkError as exc:
            if exc.kind == "frame":
                return _Answer(fc, [], frame_error=exc.reason)
            raise DriverUnavailable(
                exc.reason, f"{self.endpoint}: {request.describe()}: {exc.detail}"
            ) from None
        if link.is_serial:
            code, words = rtu.parse_answer(answer, frame)
        else:
            code, words = parse_mbap_answer(answer, frame)
        return _Answer(fc, words, exception_code=code)

    def _fill(self, request: Request, response: Any, out: _Columns) -> None:
        if isinstance(response, _Answer) and response.frame_error:
            for slot in request.slots:
                out.bad[slot.index] = RawReading(slot.tag, None, "bad", response.frame_error)
            return
        code = _code(response)
        if code is not None:
            _fill_bad(request.slots, code, out)
            return
        if response.function_code != request.function_code:
            # check_frame already refuses this; never decode another table's data.
            raise DriverUnavailable(
                "protocol error: wrong function code", f"{self.endpoint}: {request.describe()}"
            )
        payload = getattr(response, "payload", None)
        if payload is not None and not request.is_bits:
            # A register answer checked by check_frame (byte count = 2 × count): decoded
            # from its bytes as received.
            self._fill_bytes(request, payload, out)
            return
        words = response.bits if request.is_bits else response.registers
        size = len(words)
        if (request.is_bits and not request.count <= size < request.count + 8) or (
            not request.is_bits and size != request.count
        ):
            raise DriverUnavailable(
                "protocol error: wrong byte count",
                f"{self.endpoint}: {size} values for {request.describe()}",
            )
        try:
            values = request.decoder.decode(words)
        except CodecError as exc:
            reason = f"short response: {exc}"
            for slot in request.slots:
                out.bad[slot.index] = RawReading(slot.tag, None, "bad", reason)
            return
        into, bad = out.values, out.bad
        for slot, index, value in zip(request.slots, self._indices(request), values, strict=True):
            if isinstance(value, DecodeFailure):
                bad[index] = RawReading(slot.tag, None, "bad", value.reason)
            else:
                into[index] = value

    def _fill_bytes(self, request: Request, payload: bytes, out: _Columns) -> None:
        decoder = request.decoder
        try:
            values = decoder.decode_bytes(payload)
        except CodecError as exc:
            reason = f"short response: {exc}"
            for slot in request.slots:
                out.bad[slot.index] = RawReading(slot.tag, None, "bad", reason)
            return
        indices = self._indices(request)
        into = out.values
        if decoder.numbers_only:  # no DecodeFailure possible
            numbers = cast(Sequence[Scalar], values)
            first = indices[0]
            if indices[-1] - first == len(indices) - 1 and indices == list(
                range(first, first + len(indices))
            ):
                into[first : first + len(indices)] = numbers
                return
            for index, number in zip(indices, numbers, strict=True):
                into[index] = number
            return
        bad = out.bad
        for slot, index, value in zip(request.slots, indices, values, strict=True):
            if isinstance(value, DecodeFailure):
                bad[index] = RawReading(slot.tag, None, "bad", value.reason)
            else:
                into[index] = value

    def _indices(self, request: Request) -> list[int]:
        """The tag index of each slot of `request` (computed once per request object)."""
        cached = self._slot_indices.get(id(request))
        if cached is None or cached[0] is not request:
            if len(self._slot_indices) >= _SLOT_CACHE_MAX:  # isolation made many sub-requests
                self._slot_indices.clear()
            cached = (request, [slot.index for slot in request.slots])
            self._slot_indices[id(request)] = cached
        return cached[1]


_SLOT_CACHE_MAX = 4096


@dataclass(slots=True)
class _Answer:
    """A decoded answer received through a link, shaped like pymodbus' responses."""

    function_code: int
    words: list[int]
    exception_code: int | None = None
    frame_error: str = ""
    #: The data bytes of a read answer on the device's own connection (after the byte
    #: count), as received; `words` is then empty and made from it on demand.
    payload: bytes | None = None

    def isError(self) -> bool:
        return self.exception_code is not None

    @property
    def registers(self) -> list[int]:
        if self.payload is not None:
            data = self.payload
            return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2)]
        return self.words

    @property
    def bits(self) -> list[int]:
        if self.payload is not None:
            data = self.payload
            return [(data[i // 8] >> (i % 8)) & 1 for i in range(8 * len(data))]
        return self.words


def mbap_read_request(tid: int, unit: int, function_code: int, start: int, count: int) -> bytes:
    """A Modbus/TCP read request (MBAP header + PDU)."""
    pdu = bytes((function_code,)) + start.to_bytes(2, "big") + count.to_bytes(2, "big")
    return mbap_request(tid, unit, pdu)


def mbap_request(tid: int, unit: int, pdu: bytes) -> bytes:
    """A Modbus/TCP request: MBAP header + `pdu`."""
    return (
        tid.to_bytes(2, "big")
        + b"\x00\x00"
        + (len(pdu) + 1).to_bytes(2, "big")
        + bytes((unit,))
        + pdu
    )


def parse_mbap_answer(frame: bytes, request: bytes) -> tuple[int | None, list[int]]:
    """(exception code, []) or (None, values) of a Modbus/TCP answer that passed
    `check_frame`: registers for function 3/4, exactly `count` bits for 1/2."""
    if frame[7] & 0x80:
        return frame[8], []
    if request[7] in WRITE_FUNCTIONS:
        return None, []
    count = int.from_bytes(request[10:12], "big")
    payload = frame[9:]
    if request[7] in (3, 4):
        return None, [int.from_bytes(payload[i : i + 2], "big") for i in range(0, 2 * count, 2)]
    return None, [(payload[i // 8] >> (i % 8)) & 1 for i in range(count)]


@dataclass(slots=True)
class _Columns:
    """What a poll fills in: values by tag index, and the bad readings."""

    values: list[Value | None]
    bad: dict[int, RawReading]


def _fill_bad(slots: Sequence[TagSlot], code: int, out: _Columns) -> None:
    reason = exception_reason(code)
    for slot in slots:
        out.bad[slot.index] = RawReading(slot.tag, None, "bad", reason, code)


def _bad_spans(request: Request, bad: Sequence[tuple[tuple[TagSlot, ...], int]]) -> list[str]:
    return [_span(request, cluster) for cluster, _ in bad]
