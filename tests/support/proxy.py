"""A fault-injecting TCP proxy for tests, switchable at run time.

Modes:
- ``pass``: forward both ways;
- ``cut``: close every open connection and refuse new ones (the link is down);
- ``blackhole``: accept and keep connections, but forward nothing either way
  (a device or broker that stopped answering);
- ``delay``: forward, each chunk held back `delay_s`;
- ``reset_after``: forward, and drop a connection once it carried `reset_after_bytes`
  bytes from the client.

It runs its own event loop on a thread, so synchronous and asyncio tests can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "cut", "blackhole", "delay", "reset_after"]


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.reset_after_bytes = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ control

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def set_mode(self, mode: Mode, *, delay_s: float = 0.0, reset_after_bytes: int = 0) -> None:
        """Switch mode; `cut` also closes every open connection at once."""
        self.delay_s = delay_s
        self.reset_after_bytes = reset_after_bytes
        self.mode = mode
        if mode == "cut":
            asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()

    async def _close_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        sent = [0]
        tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, sent)),
            asyncio.create_task(self._pipe(up_reader, writer, None)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: list[int] | None
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            while self.mode == "blackhole":
                await asyncio.sleep(0.05)
            if self.mode == "cut":
                return
            if self.mode == "delay" and self.delay_s > 0:
                await asyncio.sleep(self.delay_s)
            if sent is not None and self.mode == "reset_after":
                sent[0] += len(data)
                if sent[0] >= self.reset_after_bytes:
                    return
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
