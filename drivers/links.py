"""Links: one serial port or one TCP connection shared by every unit configured on it.

A link is owned by the framework and borrowed by drivers: an RS-485 line with 8–30
meters behind a USB adapter, a serial device server (Moxa NPort, USR) that carries RTU
over TCP, or a Modbus/TCP gateway that routes on the unit id. On such a line there is
one master and one request at a time; a serial device server often accepts one or two
TCP connections only. So every device (unit id) on a link sends its requests through
the link's `transact`, which:

- serialises the requests (one at a time; `max_transactions` for TCP gateways is 1);
- keeps the line's timing: before a request, the line must have been quiet for the
  inter-frame silence (3.5 character times from the baud rate, 1.75 ms above 19,200
  baud) plus the link's `turnaround_s` (many devices need a pause after they answered);
- waits for the answer at most the unit's own timeout, measured from the end of the
  request on the wire;
- checks the received bytes with the caller's frame check as they arrive: a frame that
  does not fit (CRC error, garbage, a partial frame cut by the timeout) is refused,
  never handed on, and the link is resynchronised: it waits until the line has been
  quiet for a silence, then discards whatever was received;
- suspends a unit that did not answer within its timeout: further requests to it fail
  at once (`LinkError(kind="suspended")`) without touching the line, for `suspend_min_s`
  doubling to `suspend_max_s` while it stays silent; its first answer lifts the
  suspension. So a dead unit costs the other units at most its timeout, once per
  suspension period, never once per request.

The protocol's framing is not known here: `transact` takes the request bytes and a
`check(data, request) -> verdict` function (FRAME_OK "", FRAME_INCOMPLETE "incomplete"
or the reason of the mismatch), as drivers/modbus/rtu.py and driver.py provide.

pyserial is used directly (non-blocking file descriptor driven by the event loop's
`add_reader`), which is also how pymodbus 3.16 drives a serial port
(pymodbus/transport/serialtransport.py); see drivers/modbus/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import structlog
from pydantic import Field

from drivers.base import ConfigModel

__all__ = [
    "FRAME_INCOMPLETE",
    "FRAME_OK",
    "LineTiming",
    "Link",
    "LinkConfig",
    "LinkError",
    "LinkStats",
    "Rs485Settings",
    "RtuOverTcpLink",
    "SerialLink",
    "TcpGatewayLink",
    "Transport",
    "check_link_references",
    "link_timing",
]

log = structlog.get_logger(__name__)

FRAME_OK: Final = ""
FRAME_INCOMPLETE: Final = "incomplete"

Parity = Literal["N", "E", "O"]
FrameCheck = Callable[[bytes, bytes], str]


# ------------------------------------------------------------------ config


class Rs485Settings(ConfigModel):
    """Linux RS-485 mode (TIOCSRS485), for adapters whose driver switches the
    transceiver's direction with RTS. Most USB RS-485 adapters switch it themselves and
    need none of this."""

    rts_level_for_tx: bool = Field(default=True, description="RTS level while sending.")
    rts_level_for_rx: bool = Field(default=False, description="RTS level while receiving.")
    delay_before_tx_s: float = Field(default=0.0, ge=0, description="Delay after RTS, before TX.")
    delay_before_rx_s: float = Field(default=0.0, ge=0, description="Delay after TX, before RX.")


class _LineFields(ConfigModel):
    baud: int = Field(default=19200, ge=300, le=4_000_000, description="Baud rate of the line.")
    parity: Parity = Field(default="E", description="N, E or O (Modbus default: E).")
    stop_bits: Literal[1, 2] = Field(default=1, description="1 or 2.")
    byte_size: Literal[7, 8] = Field(default=8, description="Data bits (RTU needs 8).")
    turnaround_s: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="Extra pause after every answer, before the next request on the line.",
    )
    suspend_min_s: float = Field(
        default=5.0, gt=0, description="First suspension of a unit that did not answer."
    )
    suspend_max_s: float = Field(default=60.0, gt=0, description="Longest suspension.")


class SerialLink(_LineFields):
    """An RS-485/RS-232 line on a local serial port."""

    type: Literal["serial"]
    port: str = Field(min_length=1, description="Serial device, e.g. /dev/ttyUSB0.")
    rs485: Rs485Settings | None = Field(
        default=None, description="Linux RS-485 mode, only for adapters that need it."
    )


class RtuOverTcpLink(_LineFields):
    """A serial device server (RTU frames tunnelled over one TCP connection). `baud`
    and friends describe the serial line behind it (they set the timing)."""

    type: Literal["rtu_over_tcp"]
    host: str = Field(min_length=1, description="Host name or IP of the device server.")
    port: int = Field(default=4001, ge=0, le=65535, description="TCP port (0: simulator only).")
    connect_timeout_s: float = Field(default=3.0, gt=0, description="TCP connect timeout.")


class TcpGatewayLink(ConfigModel):
    """A Modbus/TCP gateway: one TCP connection, many unit ids."""

    type: Literal["tcp"]
    host: str = Field(min_length=1, description="Host name or IP of the gateway.")
    port: int = Field(default=502, ge=0, le=65535, description="TCP port (0: simulator only).")
    connect_timeout_s: float = Field(default=3.0, gt=0, description="TCP connect timeout.")
    max_transactions: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Requests in flight at once on the connection (1: one after the other; "
        "more only for gateways that queue requests per serial port).",
    )
    turnaround_s: float = Field(
        default=0.0, ge=0, le=10, description="Pause after every answer, before the next request."
    )
    baud: int | None = Field(
        default=None,
        ge=300,
        le=4_000_000,
        description="Baud rate of the serial line behind the gateway, if any (for `plan`).",
    )
    suspend_min_s: float = Field(default=5.0, gt=0, description="First suspension of a unit.")
    suspend_max_s: float = Field(default=60.0, gt=0, description="Longest suspension.")


LinkConfig = Annotated[SerialLink | RtuOverTcpLink | TcpGatewayLink, Field(discriminator="type")]


# ------------------------------------------------------------------ timing


@dataclass(frozen=True, slots=True)
class LineTiming:
    """Timing of a serial line: character time and inter-frame silence.

    A character is start bit + data bits + parity bit (unless N) + stop bits (8E1 and
    8N2 are 11 bits). The inter-frame silence is 3.5 character times, fixed at 1.75 ms
    above 19,200 baud (Modbus over serial line specification, 2.5.1.1).
    """

    baud: int
    parity: Parity = "E"
    stop_bits: int = 1
    byte_size: int = 8

    @property
    def bits_per_char(self) -> int:
        """Bits on the wire per byte."""
        return 1 + self.byte_size + (0 if self.parity == "N" else 1) + self.stop_bits

    @property
    def char_s(self) -> float:
        """Seconds one byte takes on the wire."""
        return self.bits_per_char / self.baud

    @property
    def silence_s(self) -> float:
        """Inter-frame silence: 3.5 characters, 1.75 ms above 19,200 baud."""
        return 0.00175 if self.baud > 19200 else 3.5 * self.char_s

    def wire_s(self, nbytes: int) -> float:
        """Seconds `nbytes` take on the wire."""
        return nbytes * self.char_s


def link_address(config: SerialLink | RtuOverTcpLink | TcpGatewayLink) -> str:
    """Where a link goes, for people: the serial port, or host:port."""
    if isinstance(config, SerialLink):
        return config.port
    return f"{config.host}:{config.port}"


def link_timing(config: SerialLink | RtuOverTcpLink | TcpGatewayLink) -> LineTiming | None:
    """The serial timing of a link; None for a TCP gateway with no `baud`."""
    if isinstance(config, TcpGatewayLink):
        return None if config.baud is None else LineTiming(config.baud, "E", 1, 8)
    return LineTiming(config.baud, config.parity, config.stop_bits, config.byte_size)


# ------------------------------------------------------------------ transports


class LinkError(Exception):
    """A transaction failed. `kind`: `timeout` (no answer), `suspended` (the unit is
    suspended, nothing was sent), `frame` (a malformed answer; the link was
    resynchronised), `unavailable` (the port or connection cannot be used)."""

    def __init__(
        self,
        kind: Literal["timeout", "suspended", "frame", "unavailable"],
        reason: str,
        detail: str = "",
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.kind = kind
        self.reason = reason
        self.detail = detail


class Transport:
    """Bytes in and out of one port or connection; received bytes collect in `rx`.

    Subclasses implement `open`, `write` and `close` and feed what they receive to
    `_received` (and a loss to `_closed`); a test can pass its own to `Link` to script
    a line's faults."""

    def __init__(self) -> None:
        self.rx = bytearray()
        self.last_rx = 0.0
        self.lost: str | None = None
        self.listener: Callable[[], None] | None = None
        self._wake: asyncio.Event = asyncio.Event()

    def _received(self, data: bytes) -> None:
        self.rx += data
        self.last_rx = asyncio.get_running_loop().time()
        self._wake.set()
        if self.listener is not None:
            self.listener()

    def _closed(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        self._wake.set()
        if self.listener is not None:
            self.listener()

    async def wait_data(self, deadline: float) -> bool:
        """Wait until more bytes arrive (True) or `deadline` passes (False)."""
        self._wake.clear()
        if self.lost is not None:
            return False
        delay = deadline - asyncio.get_running_loop().time()
        if delay <= 0:
            return False
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            return False
        return self.lost is None or bool(self.rx)

    async def open(self) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def flush_input(self) -> None:
        self.rx.clear()

    def close(self) -> None:
        raise NotImplementedError


class _SerialTransport(Transport):
    def __init__(self, config: SerialLink) -> None:
        super().__init__()
        self.config = config
        self._serial: Any = None
        self._fd = -1

    async def open(self) -> None:
        import termios

        import serial

        cfg = self.config
        parity = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
        port = serial.Serial()
        port.port = cfg.port
        port.baudrate = cfg.baud
        port.bytesize = cfg.byte_size
        port.parity = parity[cfg.parity]
        port.stopbits = cfg.stop_bits
        port.timeout = 0
        port.write_timeout = 0
        port.exclusive = True
        try:
            port.open()
            if cfg.rs485 is not None:
                import serial.rs485

                rs = cfg.rs485
                port.rs485_mode = serial.rs485.RS485Settings(
                    rts_level_for_tx=rs.rts_level_for_tx,
                    rts_level_for_rx=rs.rts_level_for_rx,
                    delay_before_tx=rs.delay_before_tx_s,
                    delay_before_rx=rs.delay_before_rx_s,
                )
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            with contextlib.suppress(Exception):
                port.close()
            raise LinkError("unavailable", "port unavailable", f"{cfg.port}: {exc}") from None
        self._serial = port
        self._fd = port.fileno()
        self.lost = None
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._stop_reading()
            self._closed(f"port error: {exc}")
            return
        if data:
            self._received(data)
        else:
            self._stop_reading()
            self._closed("port closed")

    def _stop_reading(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)

    def write(self, data: bytes) -> None:
        if self._serial is None or self.lost is not None:
            raise LinkError("unavailable", "port unavailable", self.lost or "not open")
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise LinkError("unavailable", "port error", str(exc)) from None
        if written != len(data):
            raise LinkError("unavailable", "port error", "short write")

    def flush_input(self) -> None:
        if self._serial is not None:
            with contextlib.suppress(Exception):
                self._serial.reset_input_buffer()
        super().flush_input()

    def close(self) -> None:
        self._stop_reading()
        port, self._serial, self._fd = self._serial, None, -1
        if port is not None:
            with contextlib.suppress(Exception):
                port.close()


class _TcpProtocol(asyncio.Protocol):
    def __init__(self, owner: _TcpTransport) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._closed(f"connection lost: {exc}" if exc else "connection closed")


class _TcpTransport(Transport):
    def __init__(self, host: str, port: int, connect_timeout_s: float) -> None:
        super().__init__()
        self.host, self.port, self.connect_timeout_s = host, port, connect_timeout_s
        self._transport: asyncio.Transport | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: _TcpProtocol(self), self.host, self.port
                )
        except TimeoutError:
            raise LinkError("unavailable", "timeout", f"{where}: connect") from None
        except OSError as exc:
            raise LinkError("unavailable", "connection refused", f"{where}: {exc}") from None
        self._transport = transport
        self.lost = None

    def write(self, data: bytes) -> None:
        if self._transport is None or self.lost is not None:
            raise LinkError("unavailable", "connection lost", self.lost or "not connected")
        self._transport.write(data)

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()


# ------------------------------------------------------------------ the link


@dataclass(slots=True)
class _UnitState:
    suspended_until: float = 0.0
    suspend_s: float = 0.0
    silent: int = 0  # timeouts in a row


@dataclass(slots=True)
class LinkStats:
    """Counters of one link since it was made. `busy_s` is the bus time used: from the
    start of each request to the end of its answer plus silence and turnaround."""

    transactions: int = 0
    answered: int = 0
    peak_in_flight: int = 0
    timeouts: int = 0
    frame_errors: int = 0
    suspended: int = 0
    busy_s: float = 0.0
    by_reason: dict[str, int] = field(default_factory=dict)


class Link:
    """One shared serial line, serial device server connection or TCP gateway connection.

    Opened on first use and reopened after a lost connection (each `transact` that finds
    it closed tries once); `close()` closes it. Drivers borrow it with `acquire()` /
    `release()`: the last release closes the port.
    """

    def __init__(
        self,
        name: str,
        config: SerialLink | RtuOverTcpLink | TcpGatewayLink,
        *,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._factory = transport_factory
        self.timing = link_timing(config)
        self.stats = LinkStats()
        self._lock = asyncio.Lock()
        self._transport: Transport | None = None
        self._quiet_at = 0.0
        self._units: dict[int, _UnitState] = {}
        self._users = 0
        self._tid = 0
        # Pipelined TCP gateways (max_transactions > 1): answers matched by transaction id.
        self._pipelined = isinstance(config, TcpGatewayLink) and config.max_transactions > 1
        self._slots = asyncio.Semaphore(
            config.max_transactions if isinstance(config, TcpGatewayLink) else 1
        )
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._late: dict[int, None] = {}  # transaction ids whose answers came too late
        self._log = log.bind(link=name)

    def next_tid(self) -> int:
        """The next Modbus/TCP transaction id on this link (1..65535)."""
        self._tid = self._tid % 0xFFFF + 1
        return self._tid

    @property
    def is_serial(self) -> bool:
        """True when frames are RTU frames (a serial port or RTU over TCP)."""
        return not isinstance(self.config, TcpGatewayLink)

    @property
    def silence_s(self) -> float:
        """The silence that ends a frame (0 for a TCP gateway)."""
        return self.timing.silence_s if self.timing is not None and self.is_serial else 0.0

    @property
    def where(self) -> str:
        """Port or host:port, for logs and error details."""
        cfg = self.config
        return cfg.port if isinstance(cfg, SerialLink) else f"{cfg.host}:{cfg.port}"

    def suspended_for(self, unit: int) -> float:
        """Seconds left of `unit`'s suspension (0 when it is not suspended)."""
        state = self._units.get(unit)
        if state is None:
            return 0.0
        return max(0.0, state.suspended_until - asyncio.get_running_loop().time())

    async def acquire(self) -> None:
        """Register a user and open the link if needed. Raises LinkError("unavailable")."""
        self._users += 1
        try:
            async with self._lock:
                await self._ensure_open()
        except BaseException:
            self._users -= 1
            raise

    async def release(self) -> None:
        """Unregister a user; the last one closes the link. Never raises."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            await self.close()

    async def close(self) -> None:
        """Close the port or connection; never raises."""
        async with self._lock:
            self._drop()

    def _drop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

    async def _ensure_open(self) -> Transport:
        transport = self._transport
        if transport is not None and transport.lost is None:
            return transport
        if transport is not None:
            self._log.warning("link.lost", where=self.where, reason=transport.lost)
        self._drop()
        cfg = self.config
        new: Transport
        if self._factory is not None:
            new = self._factory()
        elif isinstance(cfg, SerialLink):
            new = _SerialTransport(cfg)
        else:
            new = _TcpTransport(cfg.host, cfg.port, cfg.connect_timeout_s)
        await new.open()
        if self._pipelined:
            new.listener = lambda: self._demux(new)
        self._transport = new
        self._quiet_at = asyncio.get_running_loop().time() + self.silence_s
        self._log.info("link.opened", where=self.where)
        return new

    async def transact(
        self,
        unit: int,
        request: bytes,
        check: FrameCheck,
        timeout_s: float,
        *,
        retries: int = 0,
    ) -> bytes:
        """Send `request` to `unit` and return its answer, exactly as checked by `check`.

        `retries` repeats the request after a malformed answer (noise); a timeout is not
        retried but suspends the unit. Raises LinkError.
        """
        loop = asyncio.get_running_loop()
        left = self.suspended_for(unit)
        if left > 0:
            self.stats.suspended += 1
            raise LinkError(
                "suspended", "timeout", f"unit {unit} suspended for {left:.1f} s after no answer"
            )
        if self._pipelined:
            return await self._transact_pipelined(unit, request, check, timeout_s, retries)
        attempt = 0
        while True:
            async with self._lock:
                transport = await self._ensure_open()
                # The bus is taken from the end of the previous silence and turnaround.
                started = max(loop.time(), self._quiet_at)
                try:
                    answer = await self._exchange(transport, request, check, timeout_s)
                except LinkError as exc:
                    self._count(exc.reason)
                    if exc.kind == "timeout":
                        self._suspend(unit, exc)
                        raise
                    if exc.kind == "unavailable":
                        self._drop()
                        raise
                    self.stats.frame_errors += 1
                    await self._resync(transport)
                    if attempt >= retries:
                        raise
                    attempt += 1
                    continue
                finally:
                    self.stats.transactions += 1
                    self.stats.busy_s += max(0.0, self._quiet_at - started)
                self.stats.answered += 1
                self._answered(unit)
                return answer

    async def _transact_pipelined(
        self, unit: int, request: bytes, check: FrameCheck, timeout_s: float, retries: int
    ) -> bytes:
        """Up to `max_transactions` requests in flight on one Modbus/TCP connection, each
        answer matched to its request by the transaction id (MBAP bytes 0-1)."""
        loop = asyncio.get_running_loop()
        tid = int.from_bytes(request[0:2], "big")
        attempt = 0
        while True:
            async with self._slots:
                async with self._lock:
                    transport = await self._ensure_open()
                    wait = self._quiet_at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    future: asyncio.Future[bytes] = loop.create_future()
                    self._pending[tid] = future
                    self._late.pop(tid, None)
                    try:
                        transport.write(request)
                    except LinkError:
                        self._pending.pop(tid, None)
                        self._drop()
                        raise
                    self._quiet_at = loop.time() + self.config.turnaround_s
                    in_flight = len(self._pending)
                    self.stats.peak_in_flight = max(self.stats.peak_in_flight, in_flight)
                started = loop.time()
                try:
                    async with asyncio.timeout(timeout_s):
                        frame = await future
                except TimeoutError:
                    exc = LinkError("timeout", "timeout", f"no answer within {timeout_s} s")
                    self._count(exc.reason)
                    self._suspend(unit, exc)
                    raise exc from None
                except LinkError as exc:
                    self._count(exc.reason)
                    if exc.kind == "frame":
                        self.stats.frame_errors += 1
                        if attempt < retries:
                            attempt += 1
                            continue
                    raise
                finally:
                    if self._pending.get(tid) is future:  # timed out or cancelled
                        del self._pending[tid]
                        self._late[tid] = None  # its answer may still come: drop it then
                        while len(self._late) > 256:
                            self._late.pop(next(iter(self._late)))
                    self.stats.transactions += 1
                    self.stats.busy_s += loop.time() - started
            verdict = check(frame, request)
            if verdict == FRAME_OK:
                self.stats.answered += 1
                self._answered(unit)
                return frame
            self._count(verdict)
            self.stats.frame_errors += 1
            if attempt >= retries:
                raise LinkError("frame", verdict, f"{self.where}: {len(frame)} bytes")
            attempt += 1

    def _demux(self, transport: Transport) -> None:
        """Hand every complete MBAP frame in `transport.rx` to the request it answers.
        A frame no request waits for (other than a late one) means the stream is out of
        step: the connection is closed and every request in flight fails."""
        rx = transport.rx
        while len(rx) >= 6:
            length = int.from_bytes(rx[4:6], "big")
            if rx[2:4] != b"\x00\x00":
                self._desync(transport, "protocol error: wrong protocol id")
                return
            if not 3 <= length <= 254:
                self._desync(transport, "protocol error: bad length")
                return
            total = 6 + length
            if len(rx) < total:
                break
            frame = bytes(rx[:total])
            del rx[:total]
            tid = int.from_bytes(frame[0:2], "big")
            future = self._pending.pop(tid, None)
            if future is None:
                if tid in self._late:
                    del self._late[tid]
                    continue
                self._desync(transport, "protocol error: wrong transaction id")
                return
            if not future.done():
                future.set_result(frame)
        if transport.lost is not None:
            self._fail_pending(LinkError("unavailable", "connection lost", transport.lost))

    def _desync(self, transport: Transport, reason: str) -> None:
        transport.listener = None
        self._fail_pending(LinkError("frame", reason, f"{self.where}: stream out of step"))
        if self._transport is transport:
            self._drop()

    def _fail_pending(self, exc: LinkError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    def _count(self, reason: str) -> None:
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    async def _exchange(
        self, transport: Transport, request: bytes, check: FrameCheck, timeout_s: float
    ) -> bytes:
        loop = asyncio.get_running_loop()
        wait = self._quiet_at - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        transport.flush_input()
        sent = loop.time()
        transport.write(request)
        # The answer cannot start before the request is on the wire; the unit's timeout
        # counts from there (a 256-byte write takes 0.27 s at 9,600 baud).
        on_wire = self.timing.wire_s(len(request)) if self.timing and self.is_serial else 0.0
        deadline = sent + on_wire + timeout_s
        turnaround = self.config.turnaround_s
        # Until this exchange ends the line belongs to this answer: if the caller is
        # cancelled meanwhile, the next request still waits out the answer's window, so
        # a late answer is flushed and never read as the answer to another request.
        self._quiet_at = deadline + self.silence_s + turnaround
        while True:
            data = bytes(transport.rx)
            verdict = check(data, request)
            if verdict == FRAME_OK:
                transport.rx.clear()
                self._quiet_at = loop.time() + self.silence_s + turnaround
                return data
            if verdict != FRAME_INCOMPLETE:
                self._quiet_at = loop.time() + self.silence_s + turnaround
                raise LinkError("frame", verdict, f"{self.where}: {len(data)} bytes")
            if not await transport.wait_data(deadline):
                self._quiet_at = loop.time() + self.silence_s + turnaround
                if transport.lost is not None:
                    reason = (
                        "port error" if isinstance(self.config, SerialLink) else ("connection lost")
                    )
                    raise LinkError("unavailable", reason, transport.lost)
                if transport.rx:
                    raise LinkError(
                        "frame",
                        "protocol error: incomplete frame",
                        f"{self.where}: {len(transport.rx)} bytes, then silence for {timeout_s} s",
                    )
                raise LinkError("timeout", "timeout", f"no answer within {timeout_s} s")

    async def _resync(self, transport: Transport) -> None:
        """After a malformed answer: wait until the line is quiet for a silence (at most
        a second of continuous noise), then drop what was received. A TCP gateway's
        stream cannot be resynchronised: its connection is closed instead."""
        if not self.is_serial:
            self._drop()
            return
        loop = asyncio.get_running_loop()
        silence = max(self.silence_s, 0.002)
        give_up = loop.time() + 1.0
        while loop.time() < give_up:
            quiet_until = max(transport.last_rx, loop.time()) + silence
            if not await transport.wait_data(min(quiet_until, give_up)):
                break
        transport.flush_input()
        self._quiet_at = loop.time() + self.silence_s + self.config.turnaround_s

    def _suspend(self, unit: int, exc: LinkError) -> None:
        state = self._units.setdefault(unit, _UnitState())
        cfg = self.config
        state.silent += 1
        state.suspend_s = (
            cfg.suspend_min_s
            if state.suspend_s == 0
            else min(cfg.suspend_max_s, state.suspend_s * 2)
        )
        state.suspended_until = asyncio.get_running_loop().time() + state.suspend_s
        self.stats.timeouts += 1
        if state.silent == 1:
            self._log.warning(
                "link.unit.suspended", unit=unit, suspend_s=state.suspend_s, reason=str(exc)
            )

    def _answered(self, unit: int) -> None:
        state = self._units.get(unit)
        if state is not None and state.silent:
            self._log.info("link.unit.resumed", unit=unit)
            del self._units[unit]


# ------------------------------------------------------------------ config cross-checks

_TRANSPORT_OF: Final[dict[str, str]] = {
    "serial": "rtu",
    "rtu_over_tcp": "rtu_over_tcp",
    "tcp": "tcp",
}


def check_link_references(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Problems of the raw config `data` across devices and links, as (path, message):
    a device's `link` that is not defined, two enabled devices with the same unit id on
    one link, a `transport` that does not match its link's type."""
    out: list[tuple[tuple[Any, ...], str]] = []
    links_raw = data.get("links")
    links: dict[str, Any] = links_raw if isinstance(links_raw, dict) else {}
    devices = data.get("devices")
    if not isinstance(devices, list):
        return out
    claimed: dict[tuple[str, object], int] = {}
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict) or not isinstance(dev.get("link"), str):
            continue
        name = dev["link"]
        if name not in links:
            defined = ", ".join(sorted(str(k) for k in links)) or "none"
            out.append((("devices", i, "link"), f"unknown link {name!r}; defined: {defined}"))
            continue
        link = links[name]
        kind = link.get("type") if isinstance(link, dict) else None
        transport = dev.get("transport")
        if (
            isinstance(kind, str)
            and kind in _TRANSPORT_OF
            and isinstance(transport, str)
            and transport != _TRANSPORT_OF[kind]
        ):
            out.append(
                (
                    ("devices", i, "transport"),
                    f"transport {transport} does not match link {name!r} of type {kind} "
                    f"(use {_TRANSPORT_OF[kind]}, or leave transport out)",
                )
            )
        unit = dev.get("unit_id", 1)
        if kind in ("serial", "rtu_over_tcp") and isinstance(unit, int) and not 1 <= unit <= 247:
            out.append(
                (
                    ("devices", i, "unit_id"),
                    f"unit {unit} on a serial line: units are 1-247 (0 is broadcast, which "
                    "no unit answers; 248-255 are reserved)",
                )
            )
        if dev.get("enabled", True) is False:
            continue
        key = (name, unit)
        if key in claimed:
            out.append(
                (
                    ("devices", i, "unit_id"),
                    f"unit {unit} on link {name!r} is already used by devices[{claimed[key]}]",
                )
            )
        else:
            claimed[key] = i
    return out
