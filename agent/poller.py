"""One device's polling loop: schedule, reconnect with backoff, quality on failure.

The same for every driver (the framework owns retries; drivers only connect, read, close):

- each poll group runs at its own fixed rate; a poll that overruns makes the group skip
  the slots it missed (counted) instead of queueing them (Telegraf's rule);
- the first poll of a device is offset by a phase taken from its name (a fraction of
  the interval, at most PHASE_MAX_S), so many devices on the same interval spread their
  requests over the interval instead of all polling at the same instant;
- a device going down publishes the transition once: one all-bad sample set with the
  reason (and the driver's status code, when it has one); while it stays down, its poll
  groups — subscribed ones included — report bad quality again only every
  `down_report_interval_s` (a heartbeat), not on every poll, so a dead device cannot push
  good data of other devices out of a full buffer;
- reconnects use exponential backoff with jitter between the device's backoff_min_s
  and backoff_max_s; a failed read closes the driver before the next connect, so a
  half-open connection (out-of-step Modbus transaction ids, a dead OPC UA session) is
  never reused;
- the device going down is logged once (WARNING) and its recovery once (INFO);
- groups in subscribe mode are not polled: the driver pushes their readings, and
  `wait_closed()` tells the poller when the connection is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from agent.normalize import Columns, Readings, bad_readings
from drivers.base import ColumnReader, DeviceCommon, Driver, DriverError, SubscribingDriver

log = structlog.get_logger()

#: The largest start offset of a device's polls (see the module docstring).
PHASE_MAX_S = 0.5

ReadingSink = Callable[[Readings], Awaitable[None]]


DeviceState = Literal["starting", "up", "down"]


@dataclass
class DeviceStatus:
    """What the operator sees about one device."""

    name: str
    protocol: str
    state: DeviceState = "starting"
    reason: str | None = None
    since: float = field(default_factory=time.time)
    polls: int = 0
    failed_polls: int = 0
    skipped_polls: int = 0
    connects: int = 0
    code: int | None = None  # the status code of the failure that took it down, if any
    #: Polls (or, for a subscribe-only device, connection checks) finished, good or bad:
    #: the poller's heartbeat.
    cycles: int = 0
    down_reports: int = 0  # all-bad sample sets published while down
    last_poll_duration_s: float = 0.0
    errors_by_reason: dict[str, int] = field(default_factory=dict)


class Backoff:
    """Exponential backoff with jitter (between half and all of the nominal delay)."""

    def __init__(self, min_s: float, max_s: float, rng: Callable[[], float] = random.random):
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self._rng = rng
        self._n = 0

    def next(self) -> float:
        nominal = min(self.max_s, self.min_s * (2**self._n))
        self._n = min(self._n + 1, 32)
        return float(nominal * (0.5 + 0.5 * self._rng()))

    def reset(self) -> None:
        self._n = 0


class DevicePoller:
    """Runs one device until cancelled."""

    def __init__(
        self,
        device: DeviceCommon,
        protocol: str,
        driver: Driver,
        tags_by_group: dict[str, list[str]],
        sink: ReadingSink,
        *,
        subscribe_groups: frozenset[str] = frozenset(),
        on_state_change: Callable[[DeviceStatus], None] | None = None,
    ) -> None:
        """on_state_change: called (synchronously, must not raise) after every transition
        to up or down, e.g. to publish a retained device status."""
        self.device = device
        self._on_state_change = on_state_change
        self.driver = driver
        self.sink = sink
        self.status = DeviceStatus(name=device.name, protocol=protocol)
        intervals = device.group_intervals()
        self._groups = {g: intervals[g] for g in tags_by_group if tags_by_group[g]}
        self._tags = tags_by_group
        self._subscribe = subscribe_groups & set(self._groups)
        self._backoff = Backoff(device.backoff_min_s, device.backoff_max_s)
        self._connected = False
        self._next_connect = 0.0
        self._watch: asyncio.Task[None] | None = None
        self._log = log.bind(device=device.name)
        # The optional column read (drivers.base.ColumnReader) replaces read() when present.
        self._read_columns = driver if isinstance(driver, ColumnReader) else None
        per_request = device.timeout_s * (device.retries + 1)
        # A guard against a driver that hangs despite its own timeouts, not the timeout
        # users tune (that is timeout_s × (retries + 1) per request, inside the driver).
        self._read_guard_s = per_request * 3 + 5
        self._connect_guard_s = per_request + 5
        # group → loop time of its last all-bad report while down
        self._down_reported: dict[str, float] = {}
        # Groups to read now, outside their schedule (read_soon), and what wakes the loop.
        self._soon: set[str] = set()
        self._wake: asyncio.Event | None = None

    @property
    def stall_deadline_s(self) -> float:
        """How long the poller may go without finishing a poll before it counts as stalled:
        a few of its longest intervals plus the worst connect and read it may wait for."""
        longest = max(self._groups.values(), default=1.0)
        return 3 * max(longest, 1.0) + self._connect_guard_s + self._read_guard_s

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Stable per device (not random): restarts and reloads keep the same spread.
        phase = zlib.crc32(self.device.name.encode()) / 2**32
        due = {
            g: now + phase * min(interval, PHASE_MAX_S)
            for g, interval in self._groups.items()
            if g not in self._subscribe
        }
        try:
            if not due:  # subscribe-only device: keep the connection, nothing to poll
                while True:
                    await self._ensure_connected()
                    await self._report_subscribed_down()
                    self.status.cycles += 1
                    await asyncio.sleep(self._retry_delay())
            self._wake = asyncio.Event()
            while True:
                if self._soon:
                    await self._poll_soon()
                    continue
                group = min(due, key=due.__getitem__)
                delay = due[group] - loop.time()
                if delay > 0:
                    await self._sleep(delay)
                    continue  # woken for a read now, or due: look again
                started = loop.time()
                await self._poll(group)
                interval = self._groups[group]
                nxt = due[group] + interval
                now = loop.time()
                self.status.last_poll_duration_s = now - started
                self.status.cycles += 1
                if nxt <= now:
                    missed = int((now - nxt) // interval) + 1
                    self.status.skipped_polls += missed
                    nxt += missed * interval
                due[group] = nxt
        finally:
            await self._disconnect()

    def read_soon(self, groups: frozenset[str]) -> None:
        """Read these polled groups now, outside their schedule (a cycle snapshot's
        `read: at_trigger`); their regular polls keep their times. Subscribed and unknown
        groups are ignored. Safe to call from any task of the loop; never waits."""
        wanted = {g for g in groups if g in self._groups and g not in self._subscribe}
        if not wanted:
            return
        self._soon |= wanted
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, delay: float) -> None:
        wake = self._wake
        if wake is None:
            await asyncio.sleep(delay)
            return
        wake.clear()
        if self._soon:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()

    async def _poll_soon(self) -> None:
        loop = asyncio.get_running_loop()
        for group in sorted(self._soon):
            self._soon.discard(group)
            started = loop.time()
            await self._poll(group)
            self.status.last_poll_duration_s = loop.time() - started
            self.status.cycles += 1

    def _retry_delay(self) -> float:
        loop = asyncio.get_running_loop()
        if self._connected:
            return 1.0
        wait = self._next_connect - loop.time()
        if self._subscribe and self.status.state == "down":
            interval = self.device.down_report_interval_s
            due = min(self._down_reported.get(g, -interval) + interval for g in self._subscribe)
            wait = min(wait, due - loop.time())
        return max(0.05, wait)

    async def _poll(self, group: str) -> None:
        self.status.polls += 1
        await self._ensure_connected()
        readings: Readings | None = None
        if self._connected:
            try:
                async with asyncio.timeout(self._read_guard_s):
                    if self._read_columns is not None:
                        readings = Columns(*await self._read_columns.read_columns(group))
                    else:
                        readings = await self.driver.read(group)
                self._answered()
            except Exception as exc:  # a driver bug must not stop the other devices
                reason, detail, code = _describe(exc, "read")
                await self._lost(reason, detail, code)
                readings = None
        if readings is None:
            self.status.failed_polls += 1
            await self._report_subscribed_down()
            if self._down_report_due(group):
                await self._report_down([group])
            return
        failed = (
            readings.bad.values()
            if isinstance(readings, Columns)
            else [r for r in readings if r.quality == "bad"]
        )
        if failed:
            self.status.failed_polls += 1
            for r in failed:
                if r.reason:
                    n = self.status.errors_by_reason.get(r.reason, 0)
                    self.status.errors_by_reason[r.reason] = n + 1
        await self.sink(readings)

    def _down_report_due(self, group: str) -> bool:
        """While down: the first poll after the transition reports, then one every
        down_report_interval_s."""
        last = self._down_reported.get(group)
        now = asyncio.get_running_loop().time()
        return last is None or now - last >= self.device.down_report_interval_s

    async def _report_down(self, groups: Sequence[str]) -> None:
        """One all-bad sample set for `groups`, with the reason and code of the outage."""
        now = asyncio.get_running_loop().time()
        for group in groups:
            self._down_reported[group] = now
        tags = [t for g in groups for t in self._tags[g]]
        reason = self.status.reason or "unreachable"
        self.status.down_reports += 1
        self.status.errors_by_reason[reason] = self.status.errors_by_reason.get(reason, 0) + len(
            tags
        )
        await self.sink(bad_readings(tags, reason, self.status.code))

    async def _report_subscribed_down(self) -> None:
        """Subscribed groups follow the polled groups' rule while the device is down."""
        if self.status.state != "down" or self._connected:
            return
        due = [g for g in sorted(self._subscribe) if self._down_report_due(g)]
        if due:
            await self._report_down(due)

    async def _ensure_connected(self) -> None:
        loop = asyncio.get_running_loop()
        if self._connected or loop.time() < self._next_connect:
            return
        try:
            async with asyncio.timeout(self._connect_guard_s):
                await self.driver.connect()
                for group in sorted(self._subscribe):
                    assert isinstance(self.driver, SubscribingDriver)
                    await self.driver.subscribe(group, self.sink)
        except Exception as exc:
            reason, detail, code = _describe(exc, "connect")
            await self._lost(reason, detail, code)
            return
        self._connected = True
        self.status.connects += 1
        if self._subscribe:
            assert isinstance(self.driver, SubscribingDriver)
            self._watch = asyncio.create_task(
                self._watch_connection(self.driver), name=f"watch:{self.device.name}"
            )
            if len(self._subscribe) == len(self._groups):
                self._answered()  # subscribe-only: the subscription is the answer

    def _answered(self) -> None:
        """The device answered (a read returned, or its subscriptions exist). Only now is
        it up: a device that accepts connections but never answers properly (a black hole,
        garbled frames) stays down, logged once, and keeps its growing backoff."""
        self._backoff.reset()
        if self.status.state == "up":
            return
        if self.status.state == "down":
            self._log.info("device.recovered", down_s=round(time.time() - self.status.since, 1))
        else:
            self._log.info("device.connected")
        self.status.state = "up"
        self.status.reason = None
        self.status.code = None
        self._down_reported.clear()
        self.status.since = time.time()
        self._notify()

    def _notify(self) -> None:
        if self._on_state_change is not None:
            try:
                self._on_state_change(self.status)
            except Exception:
                self._log.exception("device.state_hook.failed")

    async def _watch_connection(self, driver: SubscribingDriver) -> None:
        try:
            await driver.wait_closed()
        except DriverError as exc:
            self._watch = None  # _lost must not cancel the task running it
            await self._lost(exc.reason, str(exc), exc.code)
            await self._report_subscribed_down()

    async def _lost(self, reason: str, detail: str, code: int | None = None) -> None:
        """The device is unreachable: close the driver, schedule a reconnect, log once."""
        loop = asyncio.get_running_loop()
        await self._disconnect()
        self._next_connect = loop.time() + self._backoff.next()
        if self.status.state != "down":
            self._log.warning("device.down", reason=reason, detail=detail, code=code)
            self.status.state = "down"
            self.status.since = time.time()
            self.status.reason = reason
            self.status.code = code
            self._down_reported.clear()
            self._notify()
        self.status.reason = reason
        self.status.code = code

    async def _disconnect(self) -> None:
        self._connected = False
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.wait({watch})  # unlike `await watch`, keeps our own cancellation
        with contextlib.suppress(Exception):
            await self.driver.close()


def _describe(exc: Exception, action: str) -> tuple[str, str, int | None]:
    """(reason, detail, code) of a failed connect or read."""
    if isinstance(exc, DriverError):
        return exc.reason, str(exc), exc.code
    if isinstance(exc, TimeoutError):
        return "timeout", f"{action} did not finish", None
    log.error(f"driver.{action}.bug", exc_info=exc)
    return "driver error", f"{type(exc).__name__}: {exc}", None
