"""One write request from arrival to result (docs/commands.md has the user's view).

The order, each step refusing with its reason before anything reaches the device:

1. the request's shape (`invalid_request`), commands enabled (`disabled`), the broker
   session (`insecure_session`), a correlation id (`no_correlation`);
2. the signature and its timestamp window (`unsigned`, `bad_signature`, `no_timestamp`,
   `expired`, `from_the_future`) when signing is on;
3. idempotency: a correlation id seen before gets its first result again (``duplicate``),
   a request still in progress with the same id waits for it — never a second write;
4. device and tag (`unknown_device`, `device_disabled`, `unknown_tag`, `not_writable`);
5. the value: conversion to the raw type (`wrong_type`, `not_finite`, `out_of_range`),
   limits (`not_allowed`, `below_min`, `above_max`), the rate (`rate_limited`);
6. at the device, on its poller's connection, in one turn: connected
   (`device_unavailable`), the interlock (`interlock_off`, `interlock_unreadable`), the
   value it holds now (`previous_unknown`, `step_too_large`);
7. the ``accepted`` audit record made durable (`audit_unavailable`), then the write
   (refused `driver_refused` when the driver sent nothing; failed `device_unavailable`,
   `device_error`, `timeout`, `driver_error` otherwise), then the read-back
   (failed `not_verified`, `verify_unreadable`).

Every request ends in exactly one result: done, refused or failed, and one final audit
record; the whole request is bounded by `commands.timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from agent.command.access import DeviceAccess, read_tag
from agent.command.audit import AuditLog, AuditUnavailable
from agent.command.config import CommandsConfig
from agent.command.convert import ANY, ConversionError, raw_type, to_raw, values_match
from agent.command.guards import (
    RateLimiter,
    Refusal,
    interlock_refusal,
    limit_refusal,
    step_refusal,
)
from agent.command.request import WriteRequest
from agent.command.signing import signature_refusal
from agent.normalize import scale_value
from drivers.base import (
    DeviceCommon,
    DriverError,
    DriverUnavailable,
    Scalar,
    TagCommon,
    Value,
    WriteRefused,
    WritingDriver,
)

log = structlog.get_logger()

Outcome = Literal["done", "refused", "failed"]

#: Bumped when a result's or an audit record's fields change meaning.
FORMAT_VERSION = 1


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class WriteResult:
    """The one result of a request (published to the requester, and audited)."""

    result: Outcome
    device: str | None
    tag: str | None
    value: object
    reason: str | None = None
    detail: str | None = None
    raw: Scalar | None = None
    previous: object = None
    holds: object = None
    verified: bool | None = None
    correlation: str | None = None
    received: float | None = None
    finished: float | None = None
    duplicate: bool = False
    #: The write was handed to the driver (not part of the message: `failed` says it).
    sent: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "result": self.result,
            "reason": self.reason,
            "detail": self.detail,
            "device": self.device,
            "tag": self.tag,
            "value": self.value,
            "raw": self.raw,
            "previous": self.previous,
            "holds": self.holds,
            "verified": self.verified,
            "correlation": self.correlation,
            "received": _iso(self.received),
            "finished": _iso(self.finished),
            "duplicate": self.duplicate,
        }

    @classmethod
    def from_audit(cls, record: Mapping[str, Any]) -> WriteResult | None:
        """The result an audit `result` record holds (to restore idempotency at start)."""
        if record.get("event") != "result" or record.get("result") not in (
            "done",
            "refused",
            "failed",
        ):
            return None

        def ts(key: str) -> float | None:
            v = record.get(key)
            try:
                return datetime.fromisoformat(v).timestamp() if isinstance(v, str) else None
            except ValueError:
                return None

        return cls(
            result=record["result"],
            device=record.get("device"),
            tag=record.get("tag"),
            value=record.get("value"),
            reason=record.get("reason"),
            detail=record.get("detail"),
            raw=record.get("raw"),
            previous=record.get("previous"),
            holds=record.get("holds"),
            verified=record.get("verified"),
            correlation=record.get("correlation"),
            received=ts("received"),
            finished=ts("finished"),
        )


class _Stop(Exception):
    """Ends a request early with its result."""

    def __init__(self, result: Outcome, refusal: Refusal) -> None:
        self.result = result
        self.refusal = refusal


def _refuse(code: str, text: str) -> _Stop:
    return _Stop("refused", Refusal(code, text))


def _fail(code: str, text: str) -> _Stop:
    return _Stop("failed", Refusal(code, text))


def _engineering(raw: Value | None, tag: TagCommon) -> Value | None:
    if raw is None:
        return None
    try:
        return scale_value(raw, tag.scale, tag.offset)
    except (OverflowError, TypeError):
        return raw


class CommandHandler:
    """Carries out write requests (see the module docstring). Pure of MQTT: the caller
    hands in parsed requests and publishes the results (agent.command.service).

    devices: the current devices by name (the running config; a reload is seen at once).
    access: the device's access (its poller), None when the device is not running.
    key: the signing key when `commands.signing` is set. transport: why commands cannot
    be trusted on the session they arrived on (None: they can); see docs/commands.md."""

    def __init__(
        self,
        commands: CommandsConfig,
        devices: Callable[[], Mapping[str, DeviceCommon]],
        access: Callable[[str], DeviceAccess | None],
        audit: AuditLog,
        *,
        key: bytes | None = None,
        transport: Refusal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.commands = commands
        self._devices = devices
        self._access = access
        self.audit = audit
        self._key = key
        self._transport = transport
        self._clock = clock
        self._rate = RateLimiter()
        self._results: OrderedDict[bytes, WriteResult] = OrderedDict()
        self._running: dict[bytes, asyncio.Future[WriteResult]] = {}
        self.counts: dict[str, int] = {}

    def restore(self) -> int:
        """Remember the results of the audit log's newest records (idempotency across a
        restart). Returns how many were restored."""
        n = 0
        for record in self.audit.recent(self.commands.remember * 2):
            result = WriteResult.from_audit(record)
            if result is not None and result.correlation:
                try:
                    key = bytes.fromhex(result.correlation)
                except ValueError:
                    continue
                self._remember(key, result)
                n += 1
        return n

    def _remember(self, key: bytes, result: WriteResult) -> None:
        self._results[key] = result
        self._results.move_to_end(key)
        while len(self._results) > self.commands.remember:
            self._results.popitem(last=False)

    async def handle(self, req: WriteRequest) -> WriteResult:
        """The result of one request. Never raises (but passes a cancellation on)."""
        received = req.received_at if req.received_at is not None else self._clock()
        req.received_at = received
        # Checked before the idempotency: an unsigned or wrongly signed request never
        # learns an earlier request's result by naming its correlation id.
        early: _Stop | None = None
        try:
            self._check_request(req)
        except _Stop as stop:
            early = stop
        key = req.correlation if early is None else None
        if key is not None:
            earlier = self._results.get(key)
            if earlier is None and key in self._running:
                earlier = await asyncio.shield(self._running[key])
            if earlier is not None:
                dup = replace(earlier, duplicate=True, finished=self._clock())
                self._audit_final(req, dup)
                self._count("duplicate")
                return dup
            fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
            self._running[key] = fut
        try:
            result = await self._handle(req, received, early)
        except BaseException:
            if key is not None and key in self._running:
                fut = self._running.pop(key)
                if not fut.done():
                    fut.cancel()
            raise
        if key is not None and key in self._running:
            self._remember(key, result)
            self._running.pop(key).set_result(result)
        self._count(result.result)
        return result

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def _handle(self, req: WriteRequest, received: float, early: _Stop | None) -> WriteResult:
        result = WriteResult(
            "done",
            req.device,
            req.tag,
            req.value,
            correlation=req.correlation.hex() if req.correlation is not None else None,
            received=received,
        )
        try:
            if early is not None:
                raise early
            try:
                async with asyncio.timeout(self.commands.timeout_s):
                    await self._carry_out(req, result)
            except TimeoutError:
                if result.sent:
                    raise _fail(
                        "timeout",
                        f"no answer within {self.commands.timeout_s:g} s (commands.timeout_s); "
                        "the write may or may not have happened",
                    ) from None
                raise _refuse(
                    "timeout",
                    f"not carried out within {self.commands.timeout_s:g} s "
                    "(commands.timeout_s); nothing was written",
                ) from None
        except _Stop as stop:
            result.result = stop.result
            result.reason = stop.refusal.code
            result.detail = stop.refusal.text
        result.finished = self._clock()
        self._audit_final(req, result)
        level = log.info if result.result == "done" else log.warning
        level(
            f"command.{result.result}",
            device=req.device,
            tag=req.tag,
            reason=result.reason,
            detail=result.detail,
            channel=req.origin.channel,
        )
        return result

    # ------------------------------------------------------------------ the steps

    def _check_request(self, req: WriteRequest) -> None:
        if req.problem is not None:
            raise _Stop("refused", req.problem)
        if not self.commands.enabled:
            raise _refuse("disabled", "writes are disabled (commands.enabled is false)")
        if req.origin.channel != "cli":
            if self._transport is not None:
                raise _Stop("refused", self._transport)
            if req.origin.channel == "mqtt" and req.correlation is None:
                raise _refuse(
                    "no_correlation",
                    "the request has no correlation data (MQTT 5 property); it is the request's id",
                )
            if self._key is not None:
                signing = self.commands.signing
                assert signing is not None
                refusal = signature_refusal(
                    self._key,
                    req.correlation or b"",
                    req.payload,
                    req.signature,
                    req.sent_at,
                    self._clock(),
                    signing.window_s,
                )
                if refusal is not None:
                    raise _Stop("refused", refusal)
                req.origin = replace(req.origin, signer=signing.signer)

    def _target(self, req: WriteRequest) -> tuple[DeviceCommon, TagCommon]:
        devices = self._devices()
        device = devices.get(req.device or "")
        if device is None:
            raise _refuse("unknown_device", f"no device {req.device!r}")
        if not device.enabled:
            raise _refuse("device_disabled", f"device {device.name!r} is disabled")
        tag = next((t for t in getattr(device, "tags", []) if t.name == req.tag), None)
        if tag is None:
            raise _refuse("unknown_tag", f"device {device.name!r} has no tag {req.tag!r}")
        if not tag.writable:
            raise _refuse("not_writable", f"tag {tag.name!r} is not writable: true")
        return device, tag

    async def _carry_out(self, req: WriteRequest, result: WriteResult) -> None:
        device, tag = self._target(req)
        spec = tag.write
        t = raw_type(tag)
        if t is None:
            raise _refuse("not_writable", f"tag {tag.name!r}: its type cannot be written")
        try:
            raw = to_raw(req.value, t, tag.scale, tag.offset)
        except ConversionError as exc:
            raise _refuse(exc.code, exc.text) from None
        result.raw = raw
        refusal = limit_refusal(req.value, spec)
        if refusal is not None:
            raise _Stop("refused", refusal)
        rate_key = (device.name, tag.name)
        limit = spec.max_per_min if spec is not None else None
        refusal = self._rate.refusal(rate_key, limit, time.monotonic())
        if refusal is not None:
            raise _Stop("refused", refusal)
        access = self._access(device.name)
        if access is None:
            raise _refuse("device_unavailable", f"device {device.name!r} is not running")
        read_s = device.timeout_s * (device.retries + 1) * 2 + 1
        try:
            async with access.exclusive() as driver:
                if not isinstance(driver, WritingDriver):
                    raise _refuse("driver_refused", f"the driver of {device.name!r} cannot write")
                if spec is not None and spec.interlock is not None:
                    await self._interlock(driver, device, spec.interlock, read_s)
                prev = await self._read(driver, device, tag, read_s)
                result.previous = _engineering(prev[0], tag) if prev[0] is not None else None
                if spec is not None and spec.max_step is not None:
                    if prev[0] is None:
                        raise _refuse(
                            "previous_unknown",
                            f"max_step needs the current value, which cannot be read: {prev[1]}",
                        )
                    refusal = step_refusal(req.value, result.previous, spec)
                    if refusal is not None:
                        raise _Stop("refused", refusal)
                self._audit_accepted(req, result)
                try:
                    await self._write(driver, tag, raw, result)
                finally:
                    if result.sent:  # attempted at the device: it counts
                        self._rate.record(rate_key, time.monotonic())
                if spec is None or spec.verify:
                    await self._verify(driver, device, tag, raw, req.value, spec, result, read_s)
        except DriverUnavailable as exc:
            if result.sent:
                raise _fail(
                    "device_unavailable",
                    f"connection lost: {exc}; the write may or may not have happened",
                ) from None
            raise _refuse("device_unavailable", f"device {device.name!r}: {exc}") from None

    async def _read(
        self, driver: WritingDriver, device: DeviceCommon, tag: TagCommon, read_s: float
    ) -> tuple[Value | None, str | None]:
        """(raw value, None) or (None, why not). DriverUnavailable passes."""
        try:
            reading = await read_tag(driver, device, tag.name, read_s)
        except DriverUnavailable:
            raise
        except TimeoutError:
            return None, "the read timed out"
        except DriverError as exc:
            return None, str(exc)
        except Exception as exc:
            log.error("command.read.bug", device=device.name, tag=tag.name, exc_info=exc)
            return None, f"driver error: {type(exc).__name__}: {exc}"
        if reading.quality == "bad" or reading.value is None:
            return None, reading.reason or "bad quality"
        return reading.value, None

    async def _interlock(
        self, driver: WritingDriver, device: DeviceCommon, name: str, read_s: float
    ) -> None:
        permit = next((t for t in getattr(device, "tags", []) if t.name == name), None)
        if permit is None:  # validate refuses this; a reload might not have
            raise _refuse("interlock_unreadable", f"interlock {name!r} is not a tag")
        value, why = await self._read(driver, device, permit, read_s)
        refusal = interlock_refusal(name, _engineering(value, permit), why)
        if refusal is not None:
            raise _Stop("refused", refusal)

    async def _write(
        self, driver: WritingDriver, tag: TagCommon, raw: Scalar, result: WriteResult
    ) -> None:
        result.sent = True
        try:
            outcome: object = await driver.write(tag.name, raw)  # type: ignore[func-returns-value]
        except WriteRefused as exc:
            result.sent = False
            raise _refuse("driver_refused", str(exc)) from None
        except DriverUnavailable:
            raise
        except DriverError as exc:
            raise _fail("device_error", f"the device refused the write: {exc}") from None
        except (TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.error("command.write.bug", tag=tag.name, exc_info=exc)
            raise _fail(
                "driver_error",
                f"driver error: {type(exc).__name__}: {exc}; the write may or may not have "
                "happened",
            ) from None
        if outcome is not None:  # the contract says None; anything else is suspicious
            log.warning("command.write.unexpected_return", tag=tag.name, returned=repr(outcome))

    async def _verify(
        self,
        driver: WritingDriver,
        device: DeviceCommon,
        tag: TagCommon,
        raw: Scalar,
        value: object,
        spec: Any,
        result: WriteResult,
        read_s: float,
    ) -> None:
        held, why = await self._read(driver, device, tag, read_s)
        if held is None:
            result.verified = False
            raise _fail("verify_unreadable", f"written, but the read-back failed: {why}")
        result.holds = _engineering(held, tag)
        tolerance = spec.tolerance if spec is not None else 0.0
        result.verified = values_match(
            raw, held, value, result.holds, tolerance, device_type=raw_type(tag) is ANY
        )
        if not result.verified:
            raise _fail(
                "not_verified",
                f"the device holds {result.holds!r} after writing {value!r}"
                + (f" (tolerance {tolerance:g})" if tolerance else ""),
            )

    # ------------------------------------------------------------------ audit

    def _record(self, req: WriteRequest, result: WriteResult, event: str) -> dict[str, Any]:
        record = result.as_dict()
        record["event"] = event
        record["who"] = req.origin.as_dict()
        record["topic"] = req.topic
        if event == "accepted":
            for key in ("result", "reason", "detail", "holds", "verified", "finished"):
                record.pop(key, None)
        return record

    def _audit_accepted(self, req: WriteRequest, result: WriteResult) -> None:
        try:
            self.audit.append(self._record(req, result, "accepted"))
        except AuditUnavailable as exc:
            raise _refuse("audit_unavailable", f"the audit log cannot be written: {exc}") from None

    def _audit_final(self, req: WriteRequest, result: WriteResult) -> None:
        # A failure is logged by the audit log; the accepted record (if any) is on disk.
        with contextlib.suppress(AuditUnavailable):
            self.audit.append(self._record(req, result, "result"))
