"""How a write reaches a device: `DeviceAccess.exclusive()` lends the device's driver for
one request (interlock read, previous-value read, write, read-back) with nothing else
on that connection in between.

- In the running agent the access is the device's poller (agent.poller.DevicePoller
  implements it): the request waits for the poll in progress, uses the poller's own
  connection (never a second one: many PLCs and serial gateways accept one), and the
  next poll waits for it. A device that is down (and not yet due for a reconnect) is
  not connected for a write either: the request is refused without touching it.
- `edge-agent write` while the agent is not running uses `DirectAccess`: one
  connection of its own, opened for the request and closed after it.

`read_tag` is a helper over the driver's `read(group)`: a tag is read with its poll group.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from drivers.base import DeviceCommon, Driver, DriverContext, DriverUnavailable, RawReading


class DeviceAccess(Protocol):
    def exclusive(self) -> AbstractAsyncContextManager[Driver]:
        """The connected driver, for this request only. Raises DriverUnavailable when the
        device is not connected (nothing was sent)."""
        ...


async def read_tag(driver: Driver, device: DeviceCommon, tag: str, timeout_s: float) -> RawReading:
    """A fresh reading of one tag (its whole poll group is read). Raises DriverError,
    TimeoutError."""
    group = "default"
    for t in getattr(device, "tags", []):
        if t.name == tag:
            group = t.group
            break
    async with asyncio.timeout(timeout_s):
        readings = await driver.read(group)
    for r in readings:
        if r.tag == tag:
            return r
    return RawReading(tag, None, "bad", reason="not in the read")


class DirectAccess:
    """A connection of its own to one device (see the module docstring)."""

    def __init__(self, device: DeviceCommon, driver: Driver, context: DriverContext) -> None:
        self.device = device
        self.driver = driver
        self.context = context

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Driver]:
        per_request = self.device.timeout_s * (self.device.retries + 1)
        try:
            async with asyncio.timeout(per_request + 5):
                await self.driver.connect()
        except TimeoutError:
            raise DriverUnavailable("timeout", "connect did not finish") from None
        try:
            yield self.driver
        finally:
            with contextlib.suppress(Exception):
                await self.driver.close()
