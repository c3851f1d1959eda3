"""drivers.modbus.tcp: a device's own connection, against a scripted raw TCP server on
loopback (what arrives, in which segments, when). The driver-level faults (every
malformed frame, silence, a closed connection) are in tests/integration/test_modbus_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from drivers.modbus.driver import check_frame, mbap_read_request
from drivers.modbus.tcp import MbapConnection, MbapError

REQUEST = mbap_read_request(7, 1, 3, 0, 2)
ANSWER = REQUEST[:4] + b"\x00\x07\x01\x03\x04\x00\x01\x00\x02"


class Server:
    """Answers each request as `respond(request, writer)` says (a coroutine)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.respond: Callable[[bytes, asyncio.StreamWriter], object] | None = None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readexactly(12)
                self.requests.append(request)
                assert self.respond is not None
                result = self.respond(request, writer)
                if asyncio.iscoroutine(result):
                    await result
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.close()


async def test_an_answer_in_several_segments_is_put_together(server: Server) -> None:
    async def respond(request: bytes, writer: asyncio.StreamWriter) -> None:
        for i in range(len(ANSWER)):  # one byte per segment
            writer.write(ANSWER[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)

    server.respond = respond
    conn = await MbapConnection.open("127.0.0.1", server.port, 1.0, check_frame)
    try:
        assert await conn.transact(REQUEST, 1.0, 0) == ANSWER
        assert await conn.transact(REQUEST, 1.0, 0) == ANSWER
    finally:
        conn.close()


async def test_a_late_answer_answers_the_retry_and_its_repeat_is_dropped(server: Server) -> None:
    answered = asyncio.Event()

    async def respond(request: bytes, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            await asyncio.sleep(0.3)  # later than the 0.2 s timeout: the client retries
        else:
            await asyncio.sleep(0.1)  # two answers in one segment would be one bad frame
        writer.write(ANSWER)
        answered.set()

    server.respond = respond
    conn = await MbapConnection.open("127.0.0.1", server.port, 1.0, check_frame)
    try:
        assert await conn.transact(REQUEST, 0.2, 1) == ANSWER
        # The answer to the first attempt and the one to the retry both arrive: the
        # second one repeats the last answer while nothing is asked, and is dropped.
        await asyncio.sleep(0.5)
        assert conn.error == ""
        assert len(server.requests) == 2
        assert server.requests[0] == server.requests[1] == REQUEST  # same transaction id
    finally:
        conn.close()


async def test_stray_bytes_while_nothing_is_asked_fail_the_next_request(server: Server) -> None:
    def respond(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ANSWER + b"\x99")

    server.respond = respond
    conn = await MbapConnection.open("127.0.0.1", server.port, 1.0, check_frame)
    try:
        with pytest.raises(MbapError) as raised:
            await conn.transact(REQUEST, 1.0, 0)
        assert (raised.value.kind, raised.value.reason) == (
            "frame",
            "protocol error: unexpected data",
        )
        with pytest.raises(MbapError) as again:
            await conn.transact(REQUEST, 1.0, 0)
        assert again.value.kind == "stray"
    finally:
        conn.close()


async def test_a_cancelled_request_leaves_the_connection_usable(server: Server) -> None:
    async def respond(request: bytes, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            await asyncio.sleep(0.2)
        writer.write(ANSWER)

    server.respond = respond
    conn = await MbapConnection.open("127.0.0.1", server.port, 1.0, check_frame)
    try:
        task = asyncio.ensure_future(conn.transact(REQUEST, 1.0, 0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # the late answer repeats the last request: dropped
        assert await conn.transact(REQUEST, 1.0, 0) == ANSWER
    finally:
        conn.close()


async def test_closed_by_the_peer_fails_the_request_in_flight_at_once(server: Server) -> None:
    def respond(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server.respond = respond
    conn = await MbapConnection.open("127.0.0.1", server.port, 1.0, check_frame)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(MbapError) as raised:
            await conn.transact(REQUEST, 30.0, 0)
        assert raised.value.kind == "lost"
        assert loop.time() - started < 30.0
        with pytest.raises(MbapError, match="connection lost"):
            await conn.transact(REQUEST, 1.0, 0)
        await asyncio.wait_for(asyncio.shield(conn.closed), 5)
    finally:
        conn.close()


async def test_nothing_listening_is_an_os_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await MbapConnection.open("127.0.0.1", port, 1.0, check_frame)


def test_works_on_uvloop_too() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> bytes:
        s = Server()
        await s.start()
        s.respond = lambda request, writer: writer.write(ANSWER)
        conn = await MbapConnection.open("127.0.0.1", s.port, 1.0, check_frame)
        try:
            return await conn.transact(REQUEST, 1.0, 0)
        finally:
            conn.close()
            await s.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == ANSWER
