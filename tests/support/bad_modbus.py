"""A misbehaving Modbus/TCP server for tests, written on raw asyncio (no pymodbus).

It answers read requests (function codes 1-4) from a computed memory: holding and
input register `a` holds `a + 1000` (mod 65536), coil and discrete input `a` is on when
`a` is odd. Addresses in `illegal` get exception 2 (illegal data address) when a request
touches them. `mode` says how it misbehaves; switch it at run time with `set_mode`:

- ``ok``: correct answers;
- ``wrong_tid`` / ``wrong_unit`` / ``wrong_protocol``: a correct PDU in an MBAP header
  with another transaction id / unit id / a non-zero protocol id;
- ``wrong_function``: the data of the request under another read function code;
- ``short_count`` / ``long_count``: one register (byte) fewer / more than asked, with a
  consistent MBAP length;
- ``bad_length``: the MBAP length field says more bytes than are sent (a short frame);
- ``garbage``: the request's transaction id followed by `GARBAGE`, bytes that are no
  Modbus frame (a client that checks headers sees a non-zero protocol id);
- ``extra``: a correct answer followed by a stray byte;
- ``silent``: accepts and reads requests, never answers;
- ``slow``: correct answers after `delay_s`;
- ``close_after``: sends the first `close_after_bytes` bytes of the answer, then closes;
- ``busy``: exception 6 (server device busy) to every request;
- ``wrong_echo``: a write (5, 6, 15, 16, 22) is answered with an echo whose last byte
  differs from the request's.

Writes are answered with their echo in the other modes (``wrong_function``: under
another function code) and recorded in `writes` (the request PDUs); a write touching an
address in `illegal` gets exception 2.

Like tests/support/proxy.py it runs its own event loop on a thread, so synchronous and
asyncio tests can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Literal

from tests.support.threaded_server import ThreadedServer

Mode = Literal[
    "ok",
    "wrong_tid",
    "wrong_unit",
    "wrong_protocol",
    "wrong_function",
    "short_count",
    "long_count",
    "bad_length",
    "garbage",
    "extra",
    "silent",
    "slow",
    "close_after",
    "busy",
    "wrong_echo",
]

GARBAGE = b"\xde\xad\xbe\xef garbage \xff"
_OTHER_FC = {1: 2, 2: 1, 3: 4, 4: 3}


def register_value(address: int) -> int:
    """What holding/input register `address` holds."""
    return (address + 1000) & 0xFFFF


def bit_value(address: int) -> bool:
    """What coil/discrete input `address` holds."""
    return address % 2 == 1


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the server received."""

    function_code: int
    start: int
    count: int


class BadModbusServer(ThreadedServer):
    """`with BadModbusServer() as server:` listens on 127.0.0.1 and `server.port`."""

    def __init__(self, *, illegal: set[int] | None = None) -> None:
        super().__init__()
        self.mode: Mode = "ok"
        self.delay_s = 0.0
        self.close_after_bytes = 0
        self.illegal: set[int] = set(illegal or ())
        self.requests: list[Seen] = []
        self.writes: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------------ control

    def set_mode(self, mode: Mode, *, delay_s: float = 0.0, close_after_bytes: int = 0) -> None:
        """Switch how the server answers from the next request on."""
        self.delay_s = delay_s
        self.close_after_bytes = close_after_bytes
        self.mode = mode

    def set_illegal(self, addresses: set[int]) -> None:
        """Register addresses refused with exception 2 from now on."""
        with self._lock:
            self.illegal = set(addresses)

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self.requests)

    # ------------------------------------------------------------------ internals

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        await super()._start()

    async def _stop(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        await super()._stop()
        # Handlers end on their own (aborted socket, or the stop event during a delay):
        # cancelling a start_server handler makes asyncio log the CancelledError.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                header = await reader.readexactly(7)
                length = int.from_bytes(header[4:6], "big")
                pdu = await reader.readexactly(length - 1)
                answer = self._answer(header, pdu)
                if answer is None:
                    continue
                if self.mode == "slow":
                    assert self._stopping is not None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.delay_s)
                    if self._stopping.is_set():
                        return
                if self.mode == "close_after":
                    writer.write(answer[: self.close_after_bytes])
                    await writer.drain()
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    def _answer(self, header: bytes, pdu: bytes) -> bytes | None:
        tid, unit = header[0:2], header[6]
        fc = pdu[0]
        start = int.from_bytes(pdu[1:3], "big")
        count = int.from_bytes(pdu[3:5], "big")
        with self._lock:
            self.requests.append(Seen(fc, start, count))
            if fc in (5, 6, 15, 16, 22):
                self.writes.append(bytes(pdu))
            illegal = self.illegal
        mode = self.mode
        if mode == "silent":
            return None
        if mode == "garbage":
            return tid + GARBAGE
        if fc in (5, 6, 15, 16, 22):
            span = range(start, start + (count if fc in (15, 16) else 1))
            if mode == "busy":
                body = bytes([fc | 0x80, 6])
            elif any(a in illegal for a in span):
                body = bytes([fc | 0x80, 2])
            else:
                body = bytes(pdu[: 7 if fc == 22 else 5])
                if mode == "wrong_echo":
                    body = body[:-1] + bytes([body[-1] ^ 0x01])
                elif mode == "wrong_function":
                    body = bytes([6 if fc == 16 else 16]) + body[1:]
        elif fc not in (1, 2, 3, 4):
            body = bytes([fc | 0x80, 1])
        elif mode == "busy":
            body = bytes([fc | 0x80, 6])
        elif fc in (3, 4) and any(a in illegal for a in range(start, start + count)):
            body = bytes([fc | 0x80, 2])
        else:
            body = bytes([_OTHER_FC[fc] if mode == "wrong_function" else fc]) + self._data(
                fc, start, count, mode
            )
        pid = b"\x00\x01" if mode == "wrong_protocol" else b"\x00\x00"
        if mode == "wrong_tid":
            tid = ((int.from_bytes(tid, "big") + 7) & 0xFFFF).to_bytes(2, "big")
        if mode == "wrong_unit":
            unit = (unit + 1) & 0xFF
        length = len(body) + 1 + (4 if mode == "bad_length" else 0)
        frame = tid + pid + length.to_bytes(2, "big") + bytes([unit]) + body
        return frame + b"\x00" if mode == "extra" else frame

    @staticmethod
    def _data(fc: int, start: int, count: int, mode: Mode) -> bytes:
        if fc in (3, 4):
            values = [register_value(a) for a in range(start, start + count)]
            if mode == "short_count":
                values = values[:-1]
            elif mode == "long_count":
                values.append(0x4242)
            raw = b"".join(v.to_bytes(2, "big") for v in values)
        else:
            packed = bytearray((count + 7) // 8)
            for i in range(count):
                if bit_value(start + i):
                    packed[i // 8] |= 1 << (i % 8)
            if mode == "short_count":
                packed = packed[:-1]
            elif mode == "long_count":
                packed.append(0xFF)
            raw = bytes(packed)
        return bytes([len(raw)]) + raw
