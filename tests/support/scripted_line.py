"""A scripted serial line for unit tests of links and drivers on links."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from drivers.links import LinkError, Transport
from drivers.modbus.rtu import encode_answer

Reply = Callable[[bytes], list[bytes] | None]


class ScriptedLine(Transport):
    """A line whose units answer with `reply(request)`: a list of chunks delivered one
    loop tick apart, or None for silence."""

    def __init__(self, reply: Reply) -> None:
        super().__init__()
        self.reply = reply
        self.writes: list[tuple[float, bytes]] = []
        self.flushes = 0
        self.opened = 0
        self.closed = 0
        self.fail_write = False
        self.delay_s = 0.001  # between the request and each chunk of its answer

    async def open(self) -> None:
        self.opened += 1
        self.lost = None

    def write(self, data: bytes) -> None:
        if self.fail_write:
            raise LinkError("unavailable", "port error", "scripted")
        loop = asyncio.get_running_loop()
        self.writes.append((loop.time(), data))
        chunks = self.reply(data)
        for n, chunk in enumerate(chunks or ()):
            loop.call_later(self.delay_s * (n + 1), self._received, chunk)

    def flush_input(self) -> None:
        self.flushes += 1
        super().flush_input()

    def close(self) -> None:
        self.closed += 1


def registers(request: bytes) -> list[bytes] | None:
    count = int.from_bytes(request[4:6], "big")
    return [encode_answer(request, [request[0]] * count)]
