"""S7 driver: ISO-on-TCP with our own frame codec, multi-variable reads planned by PDU size.

Why not python-snap7's client: its `AsyncClient.read_multi_vars` (3.3) sends one read
per item, and its synchronous client merges items with an experimental optimiser and
raises for the whole batch when one item fails, dropping the per-item return codes a
refused address needs to stay isolated to its tags. The frames we need (COTP connect,
setup communication, read variable) are small and checked byte by byte here
(`drivers.s7.codec`); python-snap7's server and client are the third-party peers our
tests cross-check against. Everything runs on asyncio streams: nothing blocks the loop.

Fault behaviour (the table is in README.md):

- connect: a refused TCP connection, a COTP disconnect (wrong rack/slot/TSAP) and no
  answer within `timeout_s` raise DriverUnavailable; the PDU size the PLC grants is
  logged, and a smaller one than configured re-plans the reads (`s7.pdu.smaller`).
- a header error on a read job fails the poll with DriverConfigError carrying what to
  change on the PLC (0x8104: PUT/GET not permitted);
- an item return code fails only that variable's tags (bad quality, `s7 item 0x05
  (address out of range)` …, with a hint about optimised block access for DBs); a
  variable holding several tags refused with 0x05 is read tag by tag to find the
  refused ones, and read whole again every `isolation_retry_s`;
- a timeout, a lost connection or any frame that is not the answer to the request
  (wrong PDU reference, lengths, item count, trailing bytes) raises DriverUnavailable;
  the poller closes the connection and reconnects, so a late answer is never taken for
  the next one. The driver never retries on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from drivers.base import (
    DriverConfigError,
    DriverError,
    DriverUnavailable,
    RawReading,
    Scalar,
    Value,
    WriteRefused,
)
from drivers.s7 import codec
from drivers.s7.codec import CodecError, FrameError, HeaderError, ItemResult, ReadItem
from drivers.s7.config import AREA_CODE, S7Device, S7Tag
from drivers.s7.plan import (
    DevicePlan,
    GroupPlan,
    Request,
    TagSlot,
    Variable,
    clusters,
    pack,
    plan_device,
    spec_of,
    sub_variable,
)

__all__ = ["ISOLATE_CODES", "S7Driver", "bad_reason"]

log = structlog.get_logger(__name__)

#: Item codes that may concern only part of a merged variable (a DB shorter than the
#: config): splitting tells the refused tags from the good ones.
ISOLATE_CODES: Final = frozenset({0x05})

_MAX_FRAME: Final = 65535


def bad_reason(code: int, variable: Variable) -> str:
    """The reason of a bad reading for item code `code`, with what to check on the PLC."""
    reason = codec.item_reason(code)
    if variable.area == "DB" and code in (0x05, 0x0A):
        return (
            f"{reason}: DB{variable.db} is missing, shorter than the config, or has "
            "'Optimized block access' on (S7-1200/1500: turn it off in the DB's "
            "properties and download)"
        )
    if code == 0x03:
        return f"{reason}: the CPU's protection level refuses this access"
    return reason


@dataclass(slots=True)
class _Isolation:
    """A variable the PLC refused whole, split into the parts it accepts."""

    good: list[Variable]
    bad: list[tuple[tuple[TagSlot, ...], int]]
    retry_at: float


class S7Driver:
    """One S7 CPU (implements drivers.base.Driver and ColumnReader).

    The plan is made in the constructor (a config error raises ValueError before any
    socket is opened). `endpoint` overrides the configured host and port.
    """

    def __init__(self, device: S7Device, *, endpoint: tuple[str, int] | None = None) -> None:
        self.device = device
        self.host, self.port = endpoint if endpoint is not None else (device.host, device.port)
        self.plan: DevicePlan = plan_device(device)
        self.pdu_size = device.pdu_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ref = 0
        # (group, planned variable) → its isolation; kept across reconnects.
        self._isolated: dict[tuple[str, Variable], _Isolation] = {}
        self._active: dict[str, tuple[Request, ...]] = {}
        self._tags = {t.name: t for t in device.tags}
        # One job at a time on the connection (a poll and a write may run at once).
        self._io_lock = asyncio.Lock()
        self._log = log.bind(device=device.name)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def group_plan(self, group: str) -> GroupPlan:
        plan = self.plan.groups.get(group)
        if plan is None:
            if group in self.device.group_intervals():
                return GroupPlan(group=group, interval_s=0.0, tags=(), requests=())
            raise ValueError(f"device {self.device.name!r} has no poll group {group!r}")
        return plan

    def active_requests(self, group: str) -> tuple[Request, ...]:
        """The requests a poll of `group` makes now: the plan, with isolated variables
        replaced by their good parts (packed again)."""
        cached = self._active.get(group)
        if cached is not None:
            return cached
        plan = self.group_plan(group)
        if not any(g == group for g, _ in self._isolated):
            requests = plan.requests
        else:
            variables: list[Variable] = []
            for request in plan.requests:
                for var in request.variables:
                    iso = self._isolated.get((group, var))
                    variables.extend(iso.good if iso is not None else (var,))
            requests = tuple(
                pack(
                    variables,
                    pdu_size=self.pdu_size,
                    max_items_per_request=self.device.max_items_per_request,
                )
            )
        self._active[group] = requests
        return requests

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """TCP, COTP connect with the TSAPs, setup communication. Raises
        DriverUnavailable ("connection refused", "timeout", "protocol error: …")."""
        await self.close()
        local, remote = self.device.tsaps()
        timeout = self.device.timeout_s
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise DriverUnavailable(
                "timeout", f"{self.endpoint}: no TCP connection within {timeout} s"
            ) from None
        except OSError as exc:
            raise DriverUnavailable("connection refused", f"{self.endpoint}: {exc}") from None
        self._reader, self._writer = reader, writer
        try:
            async with asyncio.timeout(timeout):
                writer.write(codec.cotp_connect_request(local, remote))
                await writer.drain()
                tpdu = await self._read_tpdu()
                codec.cotp_confirm(tpdu)
                ref = self._next_ref()
                writer.write(codec.cotp_data(codec.setup_request(ref, self.device.pdu_size)))
                await writer.drain()
                granted = codec.parse_setup_response(await self._read_pdu(), ref)
        except BaseException as exc:
            await self.close()
            raise self._map(exc, "connect") from None
        try:
            self._negotiated(min(granted, self.device.pdu_size))
        except ValueError as exc:  # a value that does not fit the smaller PDU
            await self.close()
            raise DriverConfigError(
                f"the PLC grants PDU size {granted}, less than pdu_size {self.device.pdu_size}",
                str(exc),
            ) from None

    def _negotiated(self, pdu_size: int) -> None:
        if pdu_size == self.pdu_size:
            return
        before = sum(len(g.requests) for g in self.plan.groups.values())
        plan = plan_device(self.device, pdu_size)  # ValueError: a value too large for it
        if pdu_size < self.device.pdu_size:
            self._log.warning(
                "s7.pdu.smaller",
                configured=self.device.pdu_size,
                granted=pdu_size,
                requests_before=before,
                requests_after=sum(len(g.requests) for g in plan.groups.values()),
            )
        self.plan, self.pdu_size = plan, pdu_size
        self._isolated.clear()
        self._active.clear()

    async def close(self) -> None:
        """Close the connection; never raises."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    # ------------------------------------------------------------------ reading

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
        """`read` without an object per value (the poller's fast path)."""
        plan = self.group_plan(group)
        tags = plan.tags
        values: list[Value | None] = [None] * len(tags)
        bad: dict[int, RawReading] = {}
        now = asyncio.get_running_loop().time()
        expired = [k for k, iso in self._isolated.items() if k[0] == group and now >= iso.retry_at]
        for key in expired:  # read whole again: the PLC may have been fixed
            del self._isolated[key]
            self._active.pop(group, None)
        for key, iso in self._isolated.items():
            if key[0] == group:
                for cluster, code in iso.bad:
                    _fill_bad(cluster, code, key[1], bad)
        refused: list[tuple[Variable, int]] = []
        for request in self.active_requests(group):
            results = await self._exchange(request)
            for var, result in zip(request.variables, results, strict=True):
                if result.code == 0xFF:
                    _fill(var, result.data, values, bad)
                elif result.code in ISOLATE_CODES and len(clusters(var)) > 1:
                    refused.append((var, result.code))
                else:
                    _fill_bad(var.slots, result.code, var, bad)
        if refused:
            await self._isolate(group, refused, values, bad, now)
        if None in values:
            for i, (tag, value) in enumerate(zip(tags, values, strict=True)):
                if value is None and i not in bad:
                    bad[i] = RawReading(tag, None, "bad", "not read")
        return tags, values, bad

    async def _isolate(
        self,
        group: str,
        refused: list[tuple[Variable, int]],
        values: list[Value | None],
        bad: dict[int, RawReading],
        now: float,
    ) -> None:
        """Read every refused variable tag by tag (clusters packed into as few requests
        as the PDU allows), record what the PLC accepts, fill this poll."""
        parts: list[tuple[Variable, Variable]] = []  # (original, part)
        for var, _ in refused:
            parts.extend((var, sub_variable(var, c)) for c in clusters(var))
        outcome: dict[int, ItemResult] = {}
        subs = [p for _, p in parts]
        for request in pack(
            subs, pdu_size=self.pdu_size, max_items_per_request=self.device.max_items_per_request
        ):
            for var, result in zip(request.variables, await self._exchange(request), strict=True):
                outcome[id(var)] = result
        for var, _ in refused:
            good: list[Variable] = []
            bad_parts: list[tuple[tuple[TagSlot, ...], int]] = []
            run: list[TagSlot] = []
            for orig, part in parts:
                if orig is not var:
                    continue
                result = outcome[id(part)]
                original_slots = tuple(
                    s for s in var.slots if s.index in {p.index for p in part.slots}
                )
                if result.code == 0xFF:
                    _fill(part, result.data, values, bad)
                    run.extend(original_slots)
                else:
                    if run:
                        good.append(sub_variable(var, run))
                        run = []
                    bad_parts.append((original_slots, result.code))
                    _fill_bad(original_slots, result.code, var, bad)
            if run:
                good.append(sub_variable(var, run))
            self._isolated[(group, var)] = _Isolation(
                good, bad_parts, now + self.device.isolation_retry_s
            )
            self._log.warning(
                "s7.variable.isolated",
                variable=var.describe(),
                bad_tags=[s.tag for c, _ in bad_parts for s in c],
                reason=codec.item_reason(bad_parts[0][1]) if bad_parts else "",
                retry_s=self.device.isolation_retry_s,
            )
        self._active.pop(group, None)

    # ------------------------------------------------------------------ wire

    def _next_ref(self) -> int:
        self._ref = self._ref % 0xFFFF + 1
        return self._ref

    async def _exchange(self, request: Request) -> list[ItemResult]:
        items = request.items
        ref = self._next_ref()
        try:
            pdu = await self._job(codec.read_request(ref, items), request.describe())
            return codec.parse_read_response(pdu, ref, items)
        except HeaderError as exc:
            raise DriverConfigError(str(exc), f"{self.endpoint}", code=exc.code) from None
        except FrameError as exc:
            raise self._map(exc, request.describe()) from None

    async def _job(self, job: bytes, what: str) -> bytes:
        """Send one S7 job and return the PDU that answers it (not yet checked)."""
        async with self._io_lock:
            writer = self._writer
            if writer is None or self._reader is None or writer.is_closing():
                raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
            try:
                async with asyncio.timeout(self.device.timeout_s):
                    writer.write(codec.cotp_data(job))
                    await writer.drain()
                    return await self._read_pdu()
            except asyncio.CancelledError:
                # Cancelled between request and answer: the answer may still come and
                # must never be read as the answer to the next request.
                writer.close()
                raise
            except BaseException as exc:
                raise self._map(exc, what) from None

    # ------------------------------------------------------------------ writing

    async def write(self, tag: str, raw: Scalar) -> None:
        """Write tag `tag` with raw value `raw` (drivers.base.WritingDriver): one write
        variable job of one item. A bool is written with the protocol's bit access
        (transport size BIT, the bit in the address): the CPU changes that bit only.
        Other values are written as their bytes (transport size BYTE), big-endian as
        the CPU stores them; a STRING is written from its current-length byte on (the
        maximum-length byte the CPU keeps is not touched).

        Raises WriteRefused (inputs, a value the type cannot hold, a value larger than
        one write at the negotiated PDU size: nothing sent), DriverError when the CPU
        refuses the job or the item (`s7 error 0x…`, `s7 item 0x…`), DriverUnavailable
        when the outcome is unknown (timeout, connection lost, an answer that does not
        fit the request)."""
        config = self._tags.get(tag)
        if config is None:
            raise WriteRefused("unknown tag", f"no tag {tag!r} on device {self.device.name!r}")
        refusal = self.device.write_refusal(tag)
        if refusal is not None:
            raise WriteRefused("not writable", f"{tag}: {refusal}")
        addr = config.resolved_address()
        kind = config.resolved_type()
        try:
            start, data = _encode_raw(config, raw)
        except CodecError as exc:
            raise WriteRefused("value does not fit", f"{tag} ({kind}): {exc}") from None
        if codec.write_request_size(len(data)) > self.pdu_size:
            raise WriteRefused(
                "value does not fit",
                f"{tag}: {len(data)} bytes do not fit one write at PDU size {self.pdu_size}",
            )
        item = ReadItem(AREA_CODE[addr.area], addr.db, start, len(data))
        bit = addr.bit if kind == "bool" else None
        what = f"write {addr.text()}" + ("" if bit is not None else f" ({len(data)} bytes)")
        ref = self._next_ref()
        try:
            pdu = await self._job(codec.write_request(ref, item, data, bit), what)
            (code,) = codec.parse_write_response(pdu, ref)
        except HeaderError as exc:
            self._log.warning("s7.write.refused", request=what, reason=str(exc))
            raise DriverError(str(exc), f"{self.endpoint}: {what}", code=exc.code) from None
        except FrameError as exc:
            self._abandon(tag, exc.reason)
            raise self._map(exc, what) from None
        except DriverUnavailable as exc:
            self._abandon(tag, exc.reason)
            raise
        if code != 0xFF:
            reason = codec.item_reason(code)
            self._log.warning("s7.write.refused", request=what, reason=reason)
            raise DriverError(reason, f"{self.endpoint}: {what}", code)

    def _abandon(self, tag: str, reason: str) -> None:
        """A write whose outcome is unknown: close the connection, so a late answer is
        never read as the answer to a later job (the next poll reports the lost
        connection and the poller reconnects)."""
        self._log.warning("s7.write.unknown_outcome", tag=tag, reason=reason)
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def _map(self, exc: BaseException, what: str) -> BaseException:
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            return exc
        if isinstance(exc, TimeoutError):
            return DriverUnavailable(
                "timeout", f"{self.endpoint}: no answer to {what} within {self.device.timeout_s} s"
            )
        if isinstance(exc, FrameError):
            if exc.reason.startswith("refused"):
                return DriverUnavailable("connection refused", f"{self.endpoint}: {exc.reason}")
            return DriverUnavailable(exc.reason, f"{self.endpoint}: answer to {what}")
        if isinstance(exc, HeaderError):
            return DriverConfigError(str(exc), self.endpoint, code=exc.code)
        if isinstance(exc, asyncio.IncompleteReadError | ConnectionError | OSError | EOFError):
            return DriverUnavailable("connection lost", f"{self.endpoint}: {exc!r}")
        return exc

    async def _read_tpdu(self) -> bytes:
        reader = self._reader
        assert reader is not None
        head = await reader.readexactly(codec.TPKT_HEADER)
        if head[0] != 3 or head[1] != 0:
            raise FrameError("protocol error: not a TPKT frame")
        length = int.from_bytes(head[2:4], "big")
        if length < codec.TPKT_HEADER + 2:
            raise FrameError("protocol error: bad TPKT length")
        return await reader.readexactly(length - codec.TPKT_HEADER)

    async def _read_pdu(self) -> bytes:
        """One S7 PDU, reassembled from COTP DT fragments."""
        out = bytearray()
        while True:
            tpdu = await self._read_tpdu()
            if tpdu[0] != 2 or tpdu[1] != 0xF0 or len(tpdu) < codec.COTP_DT_HEADER:
                if tpdu[1] & 0xF0 == 0x80:
                    raise ConnectionResetError("the PLC sent a COTP disconnect")
                raise FrameError("protocol error: not a COTP data frame")
            out += tpdu[3:]
            if len(out) > max(self.pdu_size, self.device.pdu_size) + codec.ACK_HEADER:
                raise FrameError("protocol error: answer larger than the PDU")
            if tpdu[2] & 0x80:
                return bytes(out)


def _fill(
    var: Variable, data: bytes, values: list[Value | None], bad: dict[int, RawReading]
) -> None:
    for slot in var.slots:
        try:
            values[slot.index] = codec.decode(slot.spec, data, slot.offset)
        except CodecError as exc:
            bad[slot.index] = RawReading(slot.tag, None, "bad", f"invalid value: {exc}")


def _fill_bad(
    slots: Sequence[TagSlot], code: int, var: Variable, bad: dict[int, RawReading]
) -> None:
    reason = bad_reason(code, var)
    for slot in slots:
        bad[slot.index] = RawReading(slot.tag, None, "bad", reason, code)


def _encode_raw(tag: S7Tag, raw: Scalar) -> tuple[int, bytes]:
    """(first byte, bytes) a write of `raw` to `tag` sends; bool: (its byte, 00/01).
    Raises CodecError for a value the tag's type cannot hold."""
    addr = tag.resolved_address()
    kind = tag.resolved_type()
    if kind == "bool":
        if not isinstance(raw, bool):
            raise CodecError(f"type bool needs true or false, got {raw!r}")
        return addr.byte, b"\x01" if raw else b"\x00"
    if kind == "string":
        if not isinstance(raw, str):
            raise CodecError(f"type string needs a string, got {raw!r}")
        length = tag.length or 254
        try:
            text = raw.encode("latin-1")
        except UnicodeEncodeError:
            raise CodecError(f"string {raw!r} has characters outside Latin-1") from None
        if len(text) > length:
            raise CodecError(f"string {raw!r} longer than STRING[{length}]")
        # From the current-length byte on; the characters after it are cleared.
        return addr.byte + 1, bytes((len(text),)) + text.ljust(length, b"\x00")
    if kind == "date_and_time":
        if not isinstance(raw, str):
            raise CodecError(f"type date_and_time needs an ISO date-time string, got {raw!r}")
        try:
            return addr.byte, codec.encode(spec_of(tag), raw)
        except ValueError as exc:
            raise CodecError(str(exc)) from None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise CodecError(f"type {kind} needs a number, got {raw!r}")
    if kind in ("real", "lreal"):
        if not math.isfinite(raw):
            raise CodecError(f"{raw!r} is not a finite number")
    elif not isinstance(raw, int):
        raise CodecError(f"type {kind} needs an integer, got {raw!r}")
    return addr.byte, codec.encode(spec_of(tag), raw)
