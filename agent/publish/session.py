"""The paho-mqtt 2.2 client driven from the asyncio event loop: one session per connection,
and the loop that (re)connects.

- **No paho thread.** paho is driven from the event loop with its socket callbacks, as
  aiomqtt v2 does: the socket is registered with ``loop.add_reader`` (→ ``loop_read``),
  ``on_socket_register_write``/``unregister_write`` add and remove a writer
  (→ ``loop_write``), and a small task calls ``loop_misc`` every second for keep-alive.
  Every paho callback therefore runs on the event-loop thread: futures are resolved
  directly, with no ``call_soon_threadsafe`` hops, no locks, and no race between
  ``publish()`` returning a message id and its PUBACK arriving. The one blocking paho call,
  ``connect()`` (DNS lookup + TCP connect + sending CONNECT), runs in a worker thread
  *before* any socket callback is installed, so paho writes CONNECT itself and never calls
  back into the loop from that thread; the loop takes the socket over once it returns.
- **One paho Client per connection** (`Session`). A connection that ends is thrown away
  with its client, so paho's in-memory queue goes with it and paho can never re-send an old
  message after a reconnect. paho's own reconnection never runs: we never call
  ``loop_forever`` / ``loop_start`` and construct clients with ``reconnect_on_failure=False``.
- **We own reconnection** (`Connector`): a background task reconnects with exponential
  backoff and jitter (reconnect_min_s … reconnect_max_s), reset after a successful connect.
  Transitions are logged once: ``mqtt.connected`` (INFO), ``mqtt.disconnected`` (WARNING)
  and ``mqtt.connect.failed`` (WARNING, again only when the failure reason changes).
- **Credentials per attempt** (agent.publish.cloud.login): the user name and password
  are made for every connection attempt; a login that expires (an Azure IoT Hub SAS
  token) sets ``Session.renew_at``, and the connector then closes the session cleanly at
  that time and connects again at once with fresh credentials (``mqtt.credentials.renew``,
  counted in ``renewals``, not as a disconnect).
- **CONNACK properties.** paho 2.2 ignores the broker's MQTT 5 Receive Maximum and Maximum
  Packet Size; the session keeps both (`receive_maximum`, `max_packet_size`) for the
  publisher to enforce.
- paho reports a PUBACK whose reason code is a failure like any other PUBACK and keeps the
  connection up; the session hands every PUBACK to `on_puback`.

What was sent on a session and what it means (in-flight window, results) is the
publisher's business (agent.publish.mqtt).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.publish import Message, cloud
from agent.publish.tls import (
    VAGUE_CLOSE,
    TlsSetupError,
    TrackingContext,
    describe,
    describe_text,
    ssl_context,
)

log = structlog.get_logger()

# TCP connect and CONNACK each must arrive within this; MqttConfig has no knob for it.
CONNECT_TIMEOUT_S = 10.0
# loop_misc cadence: keep-alive pings are due every keepalive_s, a second is precise enough.
_MISC_INTERVAL_S = 1.0


class ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Session:
    """One paho Client and its TCP connection; discarded when the connection ends.

    on_puback(mid, reason_code) is called for every PUBACK; on_end(reason) once, when the
    connection is over (first reason wins)."""

    def __init__(
        self, client: mqtt.Client, loop: asyncio.AbstractEventLoop, fd: int, sock: Any
    ) -> None:
        self.client = client
        self.loop = loop
        self.connack: asyncio.Future[tuple[ReasonCode, Properties | None]] = loop.create_future()
        self.ended: asyncio.Future[str] = loop.create_future()
        self.fd: int | None = fd
        self.sock: Any = sock
        self.writing = False
        self.misc_task: asyncio.Task[None] | None = None
        self.last_error: str | None = None  # paho's last MQTT_LOG_ERR line (e.g. a TLS alert)
        self.receive_maximum: int | None = None
        self.max_packet_size: int | None = None
        self.on_puback: Callable[[int, ReasonCode], None] = lambda _mid, _rc: None
        self.on_end: Callable[[str], None] = lambda _reason: None
        self.closing = False
        #: Unix time by which to reconnect with fresh credentials (an Azure SAS token
        #: that expires); None: the login does not expire.
        self.renew_at: float | None = None

    @property
    def open(self) -> bool:
        return not self.ended.done()

    def end(self, reason: str) -> None:
        """Mark the connection over (first reason wins) and release the socket."""
        first = not self.ended.done()
        if first:
            self.ended.set_result(reason)
        self.release_socket()
        if self.misc_task is not None and self.misc_task is not asyncio.current_task():
            self.misc_task.cancel()
        if first:
            self.on_end(reason)

    def release_socket(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.fd = None
            self.writing = False
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def publish(self, msg: Message) -> tuple[MQTTErrorCode, int]:
        """Hand one message to paho: (rc, mid). Raises ValueError for a message paho
        rejects (a topic with + or #, a payload over 268,435,455 bytes, a bad QoS)."""
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        return MQTTErrorCode(info.rc), info.mid

    def disconnect(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            self.client.disconnect()

    def subscribe(
        self, topic_filter: str, qos: int, callback: Callable[[str, bytes], None]
    ) -> None:
        """Route messages matching `topic_filter` to callback(topic, payload) and subscribe.
        A callback that raises is logged and its message dropped."""

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("mqtt.subscription.callback_failed", topic=msg.topic)

        self.client.message_callback_add(topic_filter, on_message)
        try:
            rc, _mid = self.client.subscribe(topic_filter, qos=qos)
        except ValueError as exc:
            log.error("mqtt.subscribe.invalid", topic_filter=topic_filter, error=str(exc))
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning(
                "mqtt.subscribe.failed", topic_filter=topic_filter, reason=mqtt.error_string(rc)
            )

    def guarded(self, step: Callable[[], MQTTErrorCode]) -> None:
        """Run one paho I/O step; an unexpected error ends the connection instead of
        leaving a reader that fails on every event-loop turn."""
        try:
            step()
        except Exception as exc:
            log.exception("mqtt.paho.error")
            self.end(f"paho error: {type(exc).__name__}: {exc}")

    def _bind_callbacks(self) -> None:
        client = self.client
        loop = self.loop

        def on_connect(
            _c: mqtt.Client,
            _u: Any,
            _f: mqtt.ConnectFlags,
            reason_code: ReasonCode,
            properties: Properties | None,
        ) -> None:
            if not self.connack.done():
                self.connack.set_result((reason_code, properties))

        def on_disconnect(
            _c: mqtt.Client,
            _u: Any,
            flags: mqtt.DisconnectFlags,
            reason_code: ReasonCode,
            _p: Properties | None,
        ) -> None:
            if flags.is_disconnect_packet_from_server:
                reason = f"broker sent DISCONNECT: {reason_code} ({reason_code.value:#04x})"
            elif reason_code == "Keep alive timeout":
                reason = "keep-alive timeout"
            elif self.closing:
                reason = "closed"
            else:
                reason = "connection lost"
            self.end(reason)

        def on_publish(
            _c: mqtt.Client, _u: Any, mid: int, reason_code: ReasonCode, _p: Properties
        ) -> None:
            self.on_puback(mid, reason_code)

        def on_socket_close(_c: mqtt.Client, _u: Any, _s: Any) -> None:
            self.release_socket()

        def on_log(_c: mqtt.Client, _u: Any, level: int, buf: str) -> None:
            # paho turns socket errors into "connection lost" and keeps the cause only in
            # its log; a TLS alert (client certificate refused under TLS 1.3 arrives with
            # the first read) is worth reporting. paho never logs credentials.
            if level == mqtt.MQTT_LOG_ERR:
                self.last_error = buf

        def on_register_write(_c: mqtt.Client, _u: Any, _s: Any) -> None:
            if self.fd is not None and not self.writing:
                loop.add_writer(self.fd, self.guarded, client.loop_write)
                self.writing = True

        def on_unregister_write(_c: mqtt.Client, _u: Any, _s: Any) -> None:
            if self.fd is not None and self.writing:
                loop.remove_writer(self.fd)
                self.writing = False

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_socket_close = on_socket_close
        client.on_log = on_log
        client.on_socket_register_write = on_register_write
        client.on_socket_unregister_write = on_unregister_write

    async def _misc(self) -> None:
        while self.open:
            await asyncio.sleep(_MISC_INTERVAL_S)
            if self.open:
                self.guarded(self.client.loop_misc)


class _ConnectJob:
    """Runs paho's blocking connect() in a worker thread; if the waiting coroutine is
    cancelled meanwhile, whoever finishes last closes the socket the thread opened."""

    def __init__(self, client: mqtt.Client, call: Callable[[], MQTTErrorCode]) -> None:
        self._client = client
        self._call = call
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned = False

    def run(self) -> MQTTErrorCode:
        try:
            return self._call()
        finally:
            with self._lock:
                self._finished = True
                if self._abandoned:
                    self._close()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._finished:
                self._close()

    def _close(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _new_client(
    cfg: MqttConfig, client_id: str, will: Message | None, window: int
) -> tuple[mqtt.Client, TrackingContext | None, float | None]:
    v5 = cfg.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else True,
        reconnect_on_failure=False,
    )
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(window)
    try:
        credentials = cloud.login(cfg)  # mqtt.profile: e.g. a fresh Azure SAS token
    except OSError as exc:
        what = "device_key_file" if cfg.profile == cloud.AZURE else "password_file"
        raise ConnectFailed(f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:
        raise ConnectFailed(str(exc)) from None
    if credentials.username is not None:
        client.username_pw_set(credentials.username, credentials.password)
    ctx: TrackingContext | None = None
    if cfg.tls is not None:
        try:
            ctx = ssl_context(cfg.tls)
        except TlsSetupError as exc:
            raise ConnectFailed(exc.reason) from None
        client.tls_set_context(ctx)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    return client, ctx, credentials.renew_at


async def connect(
    cfg: MqttConfig, client_id: str, *, will: Message | None = None, window: int | None = None
) -> Session:
    """One attempt: TCP connect, CONNECT, wait for CONNACK. Raises ConnectFailed.
    window: paho's in-flight and queue limit (default cfg.max_inflight)."""
    loop = asyncio.get_running_loop()
    client, ctx, renew_at = _new_client(cfg, client_id, will, window or cfg.max_inflight)

    def call() -> MQTTErrorCode:
        if cfg.protocol == "5":
            return client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=True)
        return client.connect(cfg.host, cfg.port, cfg.keepalive_s)

    errors: list[str] = []

    def on_log(_c: mqtt.Client, _u: Any, level: int, buf: str) -> None:
        # Runs in the connect thread. Under TLS 1.2 the broker's verdict on our
        # certificate can arrive as an alert after our side of the handshake is done:
        # paho then fails sending CONNECT and keeps the cause only in its log.
        if level == mqtt.MQTT_LOG_ERR:
            errors.append(buf)

    client.on_log = on_log
    job = _ConnectJob(client, call)
    try:
        try:
            rc = await loop.run_in_executor(None, job.run)
        except BaseException:
            # paho leaves the socket of a failed TLS handshake unclosed.
            if ctx is not None:
                ctx.close_wrapped()
            raise
    except asyncio.CancelledError:
        job.abandon()
        raise
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise ConnectFailed(describe(exc, cfg.host)) from None
    except socket.gaierror as exc:
        raise ConnectFailed(f"cannot resolve {cfg.host!r}: {exc.strerror}") from None
    except ConnectionRefusedError:
        raise ConnectFailed("connection refused") from None
    except TimeoutError:
        raise ConnectFailed(f"TCP connect timed out after {CONNECT_TIMEOUT_S} s") from None
    except OSError as exc:
        raise ConnectFailed(exc.strerror or f"{type(exc).__name__}: {exc}") from None
    sock = client.socket()
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
        job.abandon()
        if cfg.tls is not None and errors:
            raise ConnectFailed(describe_text(errors[-1]))
        raise ConnectFailed(f"connect: {mqtt.error_string(rc)}")

    session = Session(client, loop, sock.fileno(), sock)
    session.renew_at = renew_at
    session._bind_callbacks()
    fd = sock.fileno()
    loop.add_reader(fd, session.guarded, _reader(session))
    if client.want_write():
        loop.add_writer(fd, session.guarded, client.loop_write)
        session.writing = True
    session.misc_task = asyncio.create_task(session._misc(), name="mqtt.keepalive")
    try:
        await asyncio.wait(
            (session.connack, session.ended),
            timeout=CONNECT_TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if session.connack.done():
            reason_code, properties = session.connack.result()
            if reason_code.is_failure:
                raise ConnectFailed(f"broker refused: {reason_code} ({reason_code.value:#04x})")
            receive_max = getattr(properties, "ReceiveMaximum", None)
            if isinstance(receive_max, int) and receive_max > 0:
                session.receive_maximum = receive_max
            max_packet = getattr(properties, "MaximumPacketSize", None)
            if isinstance(max_packet, int) and max_packet > 0:
                session.max_packet_size = max_packet
            if session.open:
                return session
        if session.ended.done():
            if cfg.tls is not None and session.last_error is not None:
                raise ConnectFailed(describe_text(session.last_error))
            raise ConnectFailed(f"{session.ended.result()} before CONNACK")
        raise ConnectFailed(f"no CONNACK within {CONNECT_TIMEOUT_S} s")
    except BaseException:
        session.end("connect failed")
        raise


class Connector:
    """Keeps one session up: connects, waits for its end, reconnects with backoff.

    on_up(session) runs right after each successful connect (before anything else can use
    it); on_down(session, reason) once it ended. will_factory is called for every attempt
    (each has a fresh paho client), e.g. for a Sparkplug NDEATH with a new bdSeq."""

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        on_up: Callable[[Session], None],
        on_down: Callable[[Session, str], None],
        will_factory: Callable[[], Message | None] = lambda: None,
        log_fields: dict[str, Any] | None = None,
    ) -> None:
        self._cfg = cfg
        self._client_id = client_id
        self._on_up = on_up
        self._on_down = on_down
        self._will_factory = will_factory
        self._rng = random.Random()
        self._log = log.bind(**(log_fields or {}))
        self.closing = False
        self.connects = 0
        self.disconnects = 0
        self.connect_failures = 0
        self.renewals = 0  # planned reconnects with fresh credentials
        self.connected_since: float | None = None

    def _backoff(self, delay: float) -> float:
        """Jitter between half and all of the nominal delay."""
        return delay * (0.5 + 0.5 * self._rng.random())

    async def run(self) -> None:
        cfg = self._cfg
        delay = cfg.reconnect_min_s
        last_failure: str | None = None
        while not self.closing:
            try:
                session = await connect(cfg, self._client_id, will=self._will_factory())
            except ConnectFailed as exc:
                self.connect_failures += 1
                wait = self._backoff(delay)
                if exc.reason != last_failure and not (
                    exc.reason == VAGUE_CLOSE and last_failure is not None
                ):
                    self._log.warning(
                        "mqtt.connect.failed", reason=exc.reason, retry_in_s=round(wait, 2)
                    )
                    last_failure = exc.reason
                else:
                    self._log.debug("mqtt.connect.retry_failed", reason=exc.reason)
                await asyncio.sleep(wait)
                delay = min(delay * 2, cfg.reconnect_max_s)
                continue
            last_failure = None
            delay = cfg.reconnect_min_s
            self.connects += 1
            self.connected_since = time.time()
            self._on_up(session)
            try:
                renewing = await self._until_end_or_renewal(session)
                reason = await asyncio.shield(session.ended)
            finally:
                session.end("closed")
                self.connected_since = None
                self._on_down(session, session.ended.result())
            if self.closing:
                return
            if renewing:
                continue  # a planned reconnect with fresh credentials: no backoff
            self.disconnects += 1
            self._log.warning("mqtt.disconnected", reason=reason)
            await asyncio.sleep(self._backoff(delay))

    async def _until_end_or_renewal(self, session: Session) -> bool:
        """Wait for the session to end; when its credentials are due for renewal first
        (session.renew_at), close it cleanly and return True."""
        if session.renew_at is None:
            await asyncio.shield(session.ended)
            return False
        try:
            async with asyncio.timeout(max(0.0, session.renew_at - cloud.clock())):
                await asyncio.shield(session.ended)
            return False
        except TimeoutError:
            pass
        self.renewals += 1
        self._log.info("mqtt.credentials.renew", note="reconnecting with a fresh token")
        session.disconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await asyncio.shield(session.ended)
        session.end("credentials renewed")
        return True


def _reader(session: Session) -> Callable[[], MQTTErrorCode]:
    """The read step for the socket's reader callback.

    With TLS, the SSL layer decrypts whole records: one readable event can leave complete
    MQTT packets in the SSL buffer (``SSLSocket.pending()``) that the OS socket no longer
    signals, and paho's ``loop_read`` stops after as many packets as it has messages
    outstanding (at least one). Without draining here a PUBACK or CONNACK could sit in the
    buffer until the next keep-alive. Each loop_read consumes pending bytes, so this ends.
    """
    client = session.client

    def read() -> MQTTErrorCode:
        rc = client.loop_read()
        sock = session.sock
        while (
            rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            and session.open
            and isinstance(sock, ssl.SSLSocket)
            and sock.pending() > 0
        ):
            rc = client.loop_read()
        return rc

    return read


__all__ = ["CONNECT_TIMEOUT_S", "ConnectFailed", "Connector", "Session", "connect"]
