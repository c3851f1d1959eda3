"""Modbus/TCP driver: block reads planned once, decoded with our codec.

pymodbus is imported here and in `simulator.py` only; its exceptions never leave this
module. Ownership of reconnection: the agent's poller. pymodbus 3.16 starts its own
reconnect task on a lost connection only when `reconnect_delay` is truthy
(`ModbusProtocol.connection_lost`), so the client is built with `reconnect_delay=0`,
which disables it (checked in pymodbus/transport/transport.py, no busy loop: the task is
never created). pymodbus' `execute()` also silently reconnects when called without a
transport, so `read()` checks the connection first and raises DriverUnavailable instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.base import DriverUnavailable, RawReading, Value
from drivers.modbus.codec import CodecError, DecodeFailure
from drivers.modbus.config import ModbusDevice
from drivers.modbus.plan import DevicePlan, GroupPlan, Request, plan_device

__all__ = ["EXCEPTION_NAMES", "ModbusDriver"]

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


class ModbusDriver:
    """One Modbus/TCP device (implements drivers.base.Driver).

    The request plan is made in the constructor (a config error raises ValueError before
    any socket is opened). `endpoint` overrides the configured host and port, e.g. with
    the address a ModbusSimulator actually listens on.
    """

    def __init__(self, device: ModbusDevice, *, endpoint: tuple[str, int] | None = None) -> None:
        self.device = device
        self.host, self.port = endpoint if endpoint is not None else (device.host, device.port)
        self.plan: DevicePlan = plan_device(device)
        self._client: AsyncModbusTcpClient | None = None
        self._lost: asyncio.Future[None] | None = None

    @property
    def endpoint(self) -> str:
        """`host:port` for logs and error details."""
        return f"{self.host}:{self.port}"

    def group_plan(self, group: str) -> GroupPlan:
        """The plan of `group`; a group with no tags reads nothing."""
        plan = self.plan.groups.get(group)
        if plan is None:
            if group in self.device.group_intervals():
                return GroupPlan(group=group, interval_s=0.0, tags=(), requests=())
            raise ValueError(f"device {self.device.name!r} has no poll group {group!r}")
        return plan

    async def connect(self) -> None:
        """Open the TCP connection. Raises DriverUnavailable ("connection refused" or
        "timeout")."""
        await self.close()
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()

        def on_connect(connected: bool) -> None:
            if not connected and not lost.done():
                lost.set_result(None)

        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=f"modbus:{self.device.name}",
            timeout=self.device.timeout_s,
            retries=self.device.retries,
            reconnect_delay=0,
            reconnect_delay_max=0,
            trace_connect=on_connect,
        )
        started = loop.time()
        try:
            ok = await client.connect()
        except (ModbusException, OSError) as exc:
            client.close()
            raise DriverUnavailable("connection refused", f"{self.endpoint}: {exc}") from None
        if not ok:
            client.close()
            # pymodbus swallows the cause (OSError vs timeout); the elapsed time tells them
            # apart: a refusal is immediate, a timeout takes timeout_s.
            if loop.time() - started >= self.device.timeout_s * 0.9:
                raise DriverUnavailable(
                    "timeout", f"{self.endpoint}: no answer within {self.device.timeout_s} s"
                )
            raise DriverUnavailable("connection refused", self.endpoint)
        self._client = client
        self._lost = lost

    async def read(self, group: str) -> list[RawReading]:
        """One poll of `group`: one RawReading per tag of the group, in config order.

        Raw decoded values (not scaled), ts_source None. An exception response fails only
        the tags of its request; a timeout or lost connection raises DriverUnavailable.
        """
        plan = self.group_plan(group)
        out: list[RawReading | None] = [None] * len(plan.tags)
        pause = self.device.request_pause_s
        for number, request in enumerate(plan.requests):
            if number and pause > 0:
                await asyncio.sleep(pause)
            response = await self._execute(request)
            self._fill(request, response, out)
        return [
            r if r is not None else RawReading(tag, None, "bad", "not read")
            for tag, r in zip(plan.tags, out, strict=True)
        ]

    async def close(self) -> None:
        """Close the connection; never raises."""
        client, self._client = self._client, None
        self._lost = None
        if client is not None:
            # close() must never raise, whatever state pymodbus is in.
            with contextlib.suppress(Exception):
                client.close()

    # ------------------------------------------------------------------ internals

    async def _execute(self, request: Request) -> Any:
        client, lost = self._client, self._lost
        if client is None or lost is None or lost.done() or not client.connected:
            raise DriverUnavailable("connection lost", f"{self.endpoint}: not connected")
        unit = self.device.unit_id
        start, count = request.start, request.count
        if request.table == "holding":
            call = client.read_holding_registers(start, count=count, device_id=unit)
        elif request.table == "input":
            call = client.read_input_registers(start, count=count, device_id=unit)
        elif request.table == "coil":
            call = client.read_coils(start, count=count, device_id=unit)
        else:
            call = client.read_discrete_inputs(start, count=count, device_id=unit)
        task: asyncio.Future[Any] = asyncio.ensure_future(call)
        try:
            # pymodbus leaves a request pending until its timeout when the connection
            # drops; racing the request against the disconnect reports it at once.
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))
        if task.cancelled() or (lost.done() and not task.done()):
            raise DriverUnavailable("connection lost", f"{self.endpoint}: connection closed")
        exc = task.exception()
        if exc is None:
            return task.result()
        if lost.done() or not client.connected:
            raise DriverUnavailable("connection lost", f"{self.endpoint}: {exc}") from None
        if isinstance(exc, ModbusIOException | asyncio.TimeoutError | TimeoutError):
            raise DriverUnavailable(
                "timeout",
                f"{self.endpoint}: no answer to {request.describe()} within "
                f"{self.device.timeout_s} s x {self.device.retries + 1}",
            ) from None
        if isinstance(exc, ConnectionException | OSError):
            raise DriverUnavailable("connection lost", f"{self.endpoint}: {exc}") from None
        if isinstance(exc, ModbusException):
            raise DriverUnavailable("protocol error", f"{self.endpoint}: {exc}") from None
        raise exc

    def _fill(self, request: Request, response: Any, out: list[RawReading | None]) -> None:
        if response is None or response.isError():
            code = int(getattr(response, "exception_code", 0) or 0)
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            reason = f"modbus exception {code} ({name})"
            for slot in request.slots:
                out[slot.index] = RawReading(slot.tag, None, "bad", reason, code)
            return
        words = response.bits if request.is_bits else response.registers
        try:
            values = request.decoder.decode(words)
        except CodecError as exc:
            reason = f"short response: {exc}"
            for slot in request.slots:
                out[slot.index] = RawReading(slot.tag, None, "bad", reason)
            return
        for slot, value in zip(request.slots, values, strict=True):
            if isinstance(value, DecodeFailure):
                out[slot.index] = RawReading(slot.tag, None, "bad", value.reason)
            else:
                v: Value = value
                out[slot.index] = RawReading(slot.tag, v)
