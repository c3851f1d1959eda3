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
from typing import Literal

from tests.support.threaded_server import ThreadedServer

Mode = Literal["pass", "cut", "blackhole", "delay", "reset_after"]


class FaultProxy(ThreadedServer):
    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__()
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.reset_after_bytes = 0
        self.connections = 0

    def set_mode(self, mode: Mode, *, delay_s: float = 0.0, reset_after_bytes: int = 0) -> None:
        """Switch mode; `cut` also closes every open connection at once."""
        self.delay_s = delay_s
        self.reset_after_bytes = reset_after_bytes
        self.mode = mode
        if mode == "cut":
            self.abort_connections()

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
