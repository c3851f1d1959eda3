"""A tiny HTTP/1.1 server on asyncio streams for the agent's operating endpoints.

Routes:

- ``GET /``            the status page (static HTML + a little script, no external assets)
- ``GET /metrics``     Prometheus text format
- ``GET /healthz``     200 ``ok`` while every supervised task makes progress; 503 with a
                       JSON body naming the stalled or failed task and why
- ``GET /readyz``      200 when healthy, the inputs run, the buffer is writable and no
                       task is waiting to restart, else 503; the body is the JSON status
- ``GET /api/status``  the JSON status (what `edge-agent status` prints)
- ``POST /api/reload`` re-read the config file (same as SIGHUP); the JSON result

No framework: the endpoint serves a handful of small GETs to a scraper and a browser,
so one connection = one request (``Connection: close``), with size and time limits.
It has no authentication; it binds 127.0.0.1 unless the config says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from importlib import resources
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import structlog

from agent.http.metrics import CONTENT_TYPE as METRICS_TYPE
from agent.http.metrics import make_registry, render
from agent.http.status import health_json, status_json
from agent.runtime.snapshot import AgentSnapshot, health, readiness

log = structlog.get_logger()

_MAX_HEAD = 16 * 1024  # request line + headers
_READ_TIMEOUT_S = 10.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"


class _ReloadOutcome(Protocol):
    @property
    def ok(self) -> bool: ...

    def as_dict(self) -> dict[str, Any]: ...


class AgentView(Protocol):
    """What the HTTP layer needs from the agent: a snapshot to show, a reload to run."""

    def snapshot(self) -> AgentSnapshot: ...

    def reload(self) -> Awaitable[_ReloadOutcome]: ...


def status_page() -> bytes:
    """The status page's HTML (shipped next to this module)."""
    return resources.files("agent.http").joinpath("page.html").read_bytes()


class HttpServer:
    """`async with HttpServer(agent, host, port) as (host, port):` serves until exit.

    Binding fails loudly (OSError: port in use, address not available) so a wrong
    `http:` section stops the start instead of leaving the agent unobservable."""

    def __init__(self, agent: AgentView, host: str, port: int) -> None:
        self.agent = agent
        self.host = host
        self.port = port
        self._registry = make_registry(agent.snapshot)
        self._server: asyncio.Server | None = None
        self._page: bytes | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> tuple[str, int]:
        self._page = status_page()
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise OSError(
                f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        sock = self._server.sockets[0].getsockname()
        address = (str(sock[0]), int(sock[1]))
        log.info("http.listening", url=f"http://{_url_host(address[0])}:{address[1]}/")
        return address

    async def serve(self) -> None:
        """Run while the server accepts connections (a supervised task); raises if the
        listening socket is closed under it."""
        server = self._server
        if server is None:
            raise RuntimeError("http: the server is not started")
        # asyncio.Server has no event for "closed" other than serve_forever's
        # cancellation, which would end this task silently: look instead.
        while server.is_serving():  # noqa: ASYNC110
            await asyncio.sleep(1.0)
        if self._server is server:
            raise RuntimeError("http: the listening socket was closed")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            status, ctype, body = await self._respond(reader)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing to tell anyone
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _text(413, "request head too large")
        if len(head) > _MAX_HEAD:
            return _text(413, "request head too large")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text(400, "bad request line")
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = urlsplit(target).path
        try:
            return await self._route(method, path, headers)
        except Exception as exc:  # a bug in a view must not take the agent down
            log.error("http.handler.failed", path=path, error=f"{type(exc).__name__}: {exc}")
            return _text(500, "internal error; see the agent's log")

    async def _route(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, str, bytes]:
        agent = self.agent
        if path == "/api/reload":
            if method != "POST":
                return _text(405, "use POST")
            # A web page in a local browser could POST here; only same-origin or
            # non-browser clients (no Origin header) may trigger a reload.
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != headers.get("host"):
                return _text(403, "cross-origin request refused")
            result = await agent.reload()
            return 200 if result.ok else 400, JSON_TYPE, orjson.dumps(result.as_dict())
        if method != "GET":
            return _text(405, "use GET")
        if path == "/metrics":
            return 200, METRICS_TYPE, render(self._registry)
        if path == "/healthz":
            snap = agent.snapshot()
            if health(snap)[0]:
                return _text(200, "ok")
            return 503, JSON_TYPE, orjson.dumps(health_json(snap))
        if path == "/readyz":
            snap = agent.snapshot()
            ready, _ = readiness(snap)
            return 200 if ready else 503, JSON_TYPE, orjson.dumps(status_json(snap))
        if path == "/api/status":
            return 200, JSON_TYPE, orjson.dumps(status_json(agent.snapshot()))
        if path in ("/", "/index.html"):
            assert self._page is not None
            return 200, HTML_TYPE, self._page
        return _text(404, "not found; try /, /metrics, /healthz, /readyz, /api/status")


def _text(status: int, text: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (text + "\n").encode()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
