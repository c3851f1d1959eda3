"""A scriptable fake driver: the Driver contract exactly, with each call scripted.

For tests of everything above a driver (poller, runtime, simulator mode, CLI), as
`agent.publish.fake` is for the publisher. Unscripted, a fake driver behaves like a
real one: `connect()` finds the server its endpoint names on the in-process network
(`FakeSimulator`), or raises DriverUnavailable("unreachable"); `read(group)` returns
the group's tags, in config order, with the server's values. A test scripts the next
calls of a device, which are used up one by one:

    script = bench.script("oven")
    script.connect(error=DriverUnavailable("refused"))      # first connect fails
    script.read({"temp": 21.5})                              # then one read returns 21.5
    script.read(error=DriverUnavailable("timeout"), times=2)  # then two reads fail
    script.read(hang_s=math.inf)                             # then a read never returns
    script.write(error=DriverError("exception 2"))            # the next write fails
    bench.calls                                              # every call, in order

Devices on the same endpoint share one `FakeLink` through the DriverContext (as units
share a serial line); after the context is closed, reads raise DriverUnavailable.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from drivers.base import (
    DriverContext,
    DriverUnavailable,
    RawReading,
    Scalar,
    Value,
    WriteRefused,
)
from drivers.fake.config import FakeDevice
from drivers.fake.simulator import FakeNetwork, FakeServer

Op = Literal["connect", "read", "write", "close"]


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted call: wait `hang_s` first (math.inf: until cancelled), then raise
    `error`, or (read) return `values` for the tags it names — a RawReading scripts the
    quality too — and the server's values for the others."""

    values: Mapping[str, Value | RawReading] | None = None
    error: Exception | None = None
    hang_s: float | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One call a fake driver received, and how it ended ("ok" or the error's text)."""

    device: str
    op: Op
    group: str | None
    outcome: str


class FakeScript:
    """The scripted next calls of one device (see the module docstring)."""

    def __init__(self) -> None:
        self.connects: deque[Step] = deque()
        self.reads: deque[Step] = deque()
        self.writes: deque[Step] = deque()

    def connect(
        self, *, error: Exception | None = None, hang_s: float | None = None, times: int = 1
    ) -> FakeScript:
        self.connects.extend([Step(error=error, hang_s=hang_s)] * times)
        return self

    def read(
        self,
        values: Mapping[str, Value | RawReading] | None = None,
        *,
        error: Exception | None = None,
        hang_s: float | None = None,
        times: int = 1,
    ) -> FakeScript:
        self.reads.extend([Step(values=values, error=error, hang_s=hang_s)] * times)
        return self

    def write(
        self,
        *,
        error: Exception | None = None,
        hang_s: float | None = None,
        store: Value | None = None,
        times: int = 1,
    ) -> FakeScript:
        """Script the next writes: wait, raise, or (store) keep another value than the
        one written, as a device that changes what it is sent."""
        values = {"": store} if store is not None else None
        self.writes.extend([Step(values=values, error=error, hang_s=hang_s)] * times)
        return self

    @property
    def pending(self) -> int:
        return len(self.connects) + len(self.reads) + len(self.writes)


class FakeLink:
    """What devices on one endpoint share (through DriverContext.shared)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.requests = 0
        self.users: set[str] = set()
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def _hang(seconds: float | None) -> None:
    if seconds is None:
        return
    if math.isinf(seconds):
        await asyncio.Event().wait()  # until cancelled
    await asyncio.sleep(seconds)


class FakeDriver:
    """One fake device (see the module docstring)."""

    def __init__(
        self,
        device: FakeDevice,
        context: DriverContext,
        *,
        network: FakeNetwork,
        script: FakeScript | None = None,
        calls: list[Call] | None = None,
    ) -> None:
        self.device = device
        self.context = context
        self.network = network
        self.script = script if script is not None else FakeScript()
        self.calls: list[Call] = calls if calls is not None else []
        self.link: FakeLink | None = None
        self._server: FakeServer | None = None
        self._connected = False
        self._groups: dict[str, list[str]] = {}
        for tag in device.tags:
            self._groups.setdefault(tag.group, []).append(tag.name)

    def _record(self, op: Op, group: str | None, outcome: str) -> None:
        self.calls.append(Call(self.device.name, op, group, outcome))

    async def connect(self) -> None:
        step = self.script.connects.popleft() if self.script.connects else None
        try:
            if step is not None:
                await _hang(step.hang_s)
                if step.error is not None:
                    raise step.error
            server = self.network.servers.get(self.device.endpoint)
            if step is None and server is None:
                raise DriverUnavailable("unreachable", f"no fake server at {self.device.endpoint}")
            endpoint = self.device.endpoint
            self.link = self.context.shared(("fake", endpoint), lambda: FakeLink(endpoint))
            self.link.users.add(self.device.name)
        except Exception as exc:
            self._record("connect", None, f"{type(exc).__name__}: {exc}")
            raise
        self._server = server
        self._connected = True
        self._record("connect", None, "ok")

    async def read(self, group: str) -> list[RawReading]:
        step = self.script.reads.popleft() if self.script.reads else None
        try:
            if not self._connected or self.link is None:
                raise DriverUnavailable("not_connected", "read before connect")
            if self.link.closed:
                raise DriverUnavailable("link_closed", f"the link to {self.link.endpoint} closed")
            self.link.requests += 1
            if step is not None:
                await _hang(step.hang_s)
                if step.error is not None:
                    raise step.error
            readings = [self._reading(tag, step) for tag in self._groups.get(group, [])]
        except Exception as exc:
            self._record("read", group, f"{type(exc).__name__}: {exc}")
            raise
        if self._server is not None:
            self._server.reads += 1
        self._record("read", group, "ok")
        return readings

    async def write(self, tag: str, raw: Scalar) -> None:
        """Store `raw` in the fake server (reads return it), unless scripted otherwise.
        A tag marked read_only is refused (WriteRefused), as a driver refuses an area
        its protocol cannot write."""
        step = self.script.writes.popleft() if self.script.writes else None
        try:
            if not self._connected or self.link is None or self._server is None:
                raise DriverUnavailable("not_connected", "write before connect")
            if self.link.closed:
                raise DriverUnavailable("link_closed", f"the link to {self.link.endpoint} closed")
            refusal = self.device.write_refusal(tag)
            if refusal is not None:
                raise WriteRefused("read_only", refusal)
            self.link.requests += 1
            stored: Value = raw
            if step is not None:
                await _hang(step.hang_s)
                if step.error is not None:
                    raise step.error
                scripted = step.values[""] if step.values is not None else None
                if scripted is not None and not isinstance(scripted, RawReading):
                    stored = scripted
            self._server.write(self.device.name, tag, stored)  # type: ignore[arg-type]
        except Exception as exc:
            self._record("write", tag, f"{type(exc).__name__}: {exc}")
            raise
        self._record("write", tag, "ok")

    def _reading(self, tag: str, step: Step | None) -> RawReading:
        if step is not None and step.values is not None and tag in step.values:
            scripted = step.values[tag]
            if isinstance(scripted, RawReading):
                return scripted
            return RawReading(tag, scripted)
        server = self._server
        if server is None or not server.serves(self.device.name):
            return RawReading(tag, None, "bad", reason="no_value")
        return RawReading(tag, server.value(self.device.name, tag))

    async def close(self) -> None:
        self._connected = False
        self._server = None
        if self.link is not None:
            self.link.users.discard(self.device.name)
        self._record("close", None, "ok")
