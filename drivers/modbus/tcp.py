"""A device's own Modbus/TCP connection: MBAP framing on an asyncio Protocol.

The driver's requests on a device with `host` go through here instead of pymodbus'
client. Measured on the bench's modbus-wide scenario (13 requests of up to 125
registers per poll, 1,300 requests/s), pymodbus' client spent most of the agent's
Modbus time on work the driver then repeated or discarded: a transaction manager with a
future, a `wait_for` and a log-formatting `str()` of every PDU, a decoder building a
list of ints that the codec packed back into bytes, and our own frame check hooked in
as `trace_packet` on top. Here a request is one `write`, one future resolved by
`data_received`, and the checked frame itself is handed back (the codec decodes the
register bytes as they came).

Behaviour kept from the pymodbus-based driver (drivers/modbus/README.md has the table):

- Every received byte is checked with `check_frame` against the request in flight as it
  arrives; a frame that does not fit fails the request at once with its reason
  (`protocol error: …`), and the connection is then useless (`error` is set): the
  driver raises, the poller closes and reconnects, so a late or stray frame is never
  taken for the answer to a later request.
- Bytes that arrive while no request is in flight are stray data (the next request fails
  with its reason), except a repeated answer to the request just answered (a device
  answering a retried request twice): that is dropped.
- A request not answered within `timeout_s` is sent again (same transaction id: a late
  answer to the first attempt answers the retry too; part of a frame received before
  is dropped), `retries` times; then `timeout`, or `incomplete` when part of a frame
  had arrived. A lost connection fails the request
  in flight at once.

One request at a time (Modbus/TCP allows several in flight, many devices do not).
Pure asyncio: no protocol library is imported here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

__all__ = ["MbapConnection", "MbapError"]

FRAME_OK: Final = ""
FRAME_INCOMPLETE: Final = "incomplete"

FrameCheck = Callable[[bytes, bytes], str]


class MbapError(Exception):
    """A request failed. `kind`: "lost" (connection closed or not open), "timeout",
    "incomplete" (a frame stopped short at the timeout) or "frame" (the answer did not
    fit the request: `reason` is the check's verdict)."""

    def __init__(self, kind: str, reason: str = "") -> None:
        super().__init__(reason or kind)
        self.kind = kind
        self.reason = reason


class MbapConnection(asyncio.Protocol):
    """One TCP connection to a Modbus/TCP device; `await MbapConnection.open(...)`."""

    def __init__(self, check: FrameCheck) -> None:
        self._check = check
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._request = b""  # the request in flight, or the last one answered
        self._waiter: asyncio.Future[bytes] | None = None
        #: Why the connection cannot be used any more ("" while it can).
        self.error = ""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls, host: str, port: int, timeout_s: float, check: FrameCheck
    ) -> MbapConnection:
        """Connect; raises OSError (refused, unreachable) or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            _, protocol = await loop.create_connection(lambda: cls(check), host, port)
        return protocol

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its API.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.error:
            return
        buf = self._buf + data if self._buf else data
        waiter = self._waiter
        verdict = self._check(buf, self._request) if self._request else "unexpected data"
        if waiter is None:
            # Nothing asked: only a repeat of the last answer is harmless.
            if verdict == FRAME_OK:
                self._buf = b""
                return
            if verdict == FRAME_INCOMPLETE:
                self._buf = buf
                return
            self._fail("protocol error: unexpected data")
            return
        if verdict == FRAME_INCOMPLETE:
            self._buf = buf
            return
        self._buf = b""
        if verdict == FRAME_OK:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(buf)
            return
        self._fail(verdict)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.error:
            self.error = "connection lost"
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(MbapError("lost", str(exc) if exc else "connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, reason: str) -> None:
        self.error = reason
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(MbapError("frame", reason))

    # ------------------------------------------------------------------ requests

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def transact(self, frame: bytes, timeout_s: float, retries: int) -> bytes:
        """Send `frame`, return the answer that passed the check. Raises MbapError."""
        if self.error:
            kind = "lost" if self.error == "connection lost" else "stray"
            raise MbapError(kind, self.error)
        transport = self._transport
        if transport is None or transport.is_closing():
            raise MbapError("lost", "not connected")
        if self._waiter is not None:
            raise RuntimeError("MbapConnection: one request at a time")
        loop = asyncio.get_running_loop()
        self._request = frame
        self._buf = b""
        partial = False
        for _attempt in range(retries + 1):
            # A frame cut short is dropped before the retry: the device answers it anew.
            partial = partial or bool(self._buf)
            self._buf = b""
            waiter: asyncio.Future[bytes] = loop.create_future()
            self._waiter = waiter
            transport.write(frame)
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                return await waiter
            except _Expired:
                if self._waiter is waiter:
                    self._waiter = None
                continue
            finally:
                timer.cancel()
                if self._waiter is waiter:  # cancelled by the caller
                    self._waiter = None
        raise MbapError("incomplete" if partial or self._buf else "timeout")

    def close(self) -> None:
        """Close the connection; never raises."""
        if not self.error:
            self.error = "connection lost"
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(MbapError("lost", "closed"))


class _Expired(Exception):
    pass


def _expire(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())
