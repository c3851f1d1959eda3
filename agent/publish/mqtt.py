"""MQTT publisher on paho-mqtt 2.2, driven from the asyncio event loop.

Design (FIELD-NOTES.md, paho section, explains every point):

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
- **One paho Client per connection.** A connection that ends is thrown away with its
  client, so paho's in-memory queue goes with it and paho can never re-send an old message
  after a reconnect. paho's own reconnection never runs: we never call ``loop_forever`` /
  ``loop_start`` and construct clients with ``reconnect_on_failure=False``.
- **We own reconnection**: a background task reconnects with exponential backoff and jitter
  (reconnect_min_s … reconnect_max_s), reset after a successful connect. Transitions are
  logged once: ``mqtt.connected`` (INFO), ``mqtt.disconnected`` (WARNING) and
  ``mqtt.connect.failed`` (WARNING, again only when the failure reason changes).
- **One owner of retransmission: the caller.** When a connection ends, every message sent
  on it and not yet acknowledged fails with ``'disconnected before ack'``; the forwarder
  re-sends it from the durable buffer. paho never holds more than the in-flight window:
  ``max_inflight_messages`` and ``max_queued_messages`` are both set to that window, and we
  never hand paho a message while the window is full.
- **The window** is ``min(max_inflight, Receive Maximum from the MQTT 5 CONNACK)``: paho
  2.2 ignores the broker's Receive Maximum (mosquitto sends its ``max_inflight_messages``,
  20 by default), and a stricter broker disconnects a client that exceeds it.
- **Timeouts.** A message not acknowledged within ``publish_timeout_s`` fails with
  ``'timeout'`` and the connection is dropped (a broker that does not acknowledge for that
  long is treated as dead); the other unacknowledged messages then fail with
  ``'disconnected before ack'`` and the publisher reconnects. This keeps ``publish()``
  bounded and the window from filling up with messages that will never be acknowledged.
- paho 2.2 also ignores the MQTT 5 Maximum Packet Size; a message larger than the broker
  announced fails at once with 'Packet too large' (0x95) instead of getting the
  connection dropped (and every retry with it).
- MQTT 5 PUBACK reason codes ≥ 0x80 (e.g. 0x87 Not authorized, what mosquitto answers for a
  topic its ACL denies) are failures; below 0x80 (0x10 No matching subscribers) success.
  With MQTT 3.1.1 mosquitto acknowledges a denied publish as a success: prefer MQTT 5.

Only this module imports paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.publish import Message, PublishResult
from agent.publish.tls import (
    VAGUE_CLOSE,
    TlsSetupError,
    TrackingContext,
    describe,
    describe_text,
    ssl_context,
)

log = structlog.get_logger()

NOT_CONNECTED = "not connected"
DISCONNECTED = "disconnected before ack"
TIMEOUT = "timeout"

# TCP connect and CONNACK each must arrive within this; MqttConfig has no knob for it.
_CONNECT_TIMEOUT_S = 10.0
# How long close() waits for DISCONNECT to be written before dropping the socket.
_CLOSE_TIMEOUT_S = 2.0
# loop_misc cadence: keep-alive pings are due every keepalive_s, a second is precise enough.
_MISC_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counters since the publisher was created, plus the current connection state."""

    connected: bool
    connects: int
    disconnects: int
    connect_failures: int
    sent: int
    acked: int
    failed: dict[str, int]
    inflight: int
    window: int


class _ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Session:
    """One paho Client, its TCP connection and what was sent on it; discarded at the end."""

    client: mqtt.Client
    loop: asyncio.AbstractEventLoop
    window: int
    connack: asyncio.Future[tuple[ReasonCode, Properties | None]]
    ended: asyncio.Future[str]
    pending: dict[int, tuple[asyncio.Future[PublishResult], asyncio.TimerHandle]] = field(
        default_factory=dict
    )
    window_free: asyncio.Event = field(default_factory=asyncio.Event)
    max_packet: int | None = None
    fd: int | None = None
    sock: Any = None
    writing: bool = False
    misc_task: asyncio.Task[None] | None = None
    last_error: str | None = None  # paho's last MQTT_LOG_ERR line (e.g. a TLS alert)

    @property
    def open(self) -> bool:
        return not self.ended.done()

    def end(self, reason: str) -> None:
        """Mark the connection over (first reason wins) and release the socket."""
        if not self.ended.done():
            self.ended.set_result(reason)
        self.release_socket()
        self.window_free.set()

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


class MqttPublisher:
    """Publishes messages at QoS 1 (per Message.qos) and reports each PUBACK.

    client_id: the MQTT client id (see MqttConfig.resolved_client_id).
    will: the last-will message the broker publishes when the connection dies without a
        DISCONNECT (its qos and retain are used as given; pass retain=True for a status).
    on_connect_messages: called after every successful connect; the messages it returns
        are published before anything else, fire-and-forget (e.g. a retained 'online').
    will_factory: instead of `will`, called for every connection attempt (each has a
        fresh paho client) to make its will, e.g. a Sparkplug NDEATH with a new bdSeq.
    prepare: called on every message at the moment it is handed to paho, in wire order;
        returns the message to send (e.g. a Sparkplug payload stamped with its seq).
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        will: Message | None = None,
        on_connect_messages: Callable[[], Sequence[Message]] | None = None,
        will_factory: Callable[[], Message] | None = None,
        prepare: Callable[[Message], Message] | None = None,
    ) -> None:
        self._config = config
        self._client_id = client_id
        self._will = will
        self._will_factory = will_factory
        self._prepare = prepare
        self._subscriptions: list[tuple[str, int, Callable[[str, bytes], None]]] = []
        self._on_connect_messages = on_connect_messages
        self._session: _Session | None = None
        self._connected = asyncio.Event()
        self._connected_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._rng = random.Random()
        self._connects = 0
        self._disconnects = 0
        self._connect_failures = 0
        self._sent = 0
        self._acked = 0
        self._failed: dict[str, int] = {}
        self._log = log.bind(broker=f"{config.host}:{config.port}", client_id=client_id)

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up (CONNACK received, not yet lost)."""
        session = self._session
        return session is not None and session.open

    @property
    def connected_since(self) -> float | None:
        """Epoch seconds when the current session came up; None while disconnected."""
        return self._connected_since if self.connected else None

    async def wait_connected(self) -> None:
        """Return once connected (at once if connected)."""
        await self._connected.wait()

    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="mqtt.publisher")

    async def close(self) -> None:
        """Send DISCONNECT (if connected), stop reconnecting, fail what is still unacked.

        Never raises; a cancellation of the caller still propagates."""
        self._closing = True
        session = self._session
        try:
            if session is not None and session.open:
                with contextlib.suppress(Exception):
                    session.client.disconnect()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                        await asyncio.shield(session.ended)
        finally:
            if session is not None:
                session.end("closed")
                self._retire(session)
            task, self._task = self._task, None
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                except Exception:
                    self._log.exception("mqtt.task.failed")

    def subscribe(
        self, topic_filter: str, callback: Callable[[str, bytes], None], *, qos: int = 1
    ) -> None:
        """Subscribe `topic_filter` on every connection (now, if connected, and again after
        each reconnect, before the on-connect messages go out). `callback(topic, payload)`
        runs on the event loop for each message that matches; it must not block or raise
        (an exception is logged and the message dropped)."""
        self._subscriptions.append((topic_filter, qos, callback))
        session = self._session
        if session is not None and session.open:
            self._subscribe(session, topic_filter, qos, callback)

    def _subscribe(
        self,
        session: _Session,
        topic_filter: str,
        qos: int,
        callback: Callable[[str, bytes], None],
    ) -> None:
        logger = self._log

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:
                logger.exception("mqtt.subscription.callback_failed", topic=msg.topic)

        session.client.message_callback_add(topic_filter, on_message)
        try:
            rc, _mid = session.client.subscribe(topic_filter, qos=qos)
        except ValueError as exc:
            logger.error("mqtt.subscribe.invalid", topic_filter=topic_filter, error=str(exc))
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.warning(
                "mqtt.subscribe.failed", topic_filter=topic_filter, reason=mqtt.error_string(rc)
            )

    def stats(self) -> PublisherStats:
        session = self._session
        return PublisherStats(
            connected=self.connected,
            connects=self._connects,
            disconnects=self._disconnects,
            connect_failures=self._connect_failures,
            sent=self._sent,
            acked=self._acked,
            failed=dict(self._failed),
            inflight=len(session.pending) if session is not None else 0,
            window=session.window if session is not None else 0,
        )

    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]:
        """Send every message and return one result per message, in order, once each is
        acknowledged or has failed. Never raises for broker or network trouble."""
        session = self._session
        if session is None or not session.open or self._closing:
            return [self._fail(NOT_CONNECTED) for _ in messages]
        futures: list[asyncio.Future[PublishResult]] = []
        for msg in messages:
            while session.open and len(session.pending) >= session.window:
                session.window_free.clear()
                await session.window_free.wait()
            if not session.open:
                break
            futures.append(self._hand_over(session, msg))
        results = [await fut for fut in futures]
        results += [self._fail(NOT_CONNECTED) for _ in messages[len(futures) :]]
        return results

    # ------------------------------------------------------------------ sending

    def _fail(self, reason: str, code: int | None = None) -> PublishResult:
        self._failed[reason] = self._failed.get(reason, 0) + 1
        return PublishResult(ok=False, reason=reason, code=code)

    def _hand_over(self, session: _Session, msg: Message) -> asyncio.Future[PublishResult]:
        """Give one message to paho (the window must have room); its future resolves on
        PUBACK, timeout or the end of the connection."""
        fut: asyncio.Future[PublishResult] = session.loop.create_future()
        if self._prepare is not None:
            msg = self._prepare(msg)
        if session.max_packet is not None and _packet_size(msg, v5=True) > session.max_packet:
            # The broker would drop the connection over it, and every retry would too.
            fut.set_result(self._fail("Packet too large", 0x95))
            return fut
        try:
            info = session.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        except ValueError as exc:  # invalid topic, QoS or payload size: never deliverable
            fut.set_result(self._fail(f"invalid message: {exc}"))
            return fut
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_result(self._fail(f"paho: {mqtt.error_string(info.rc)}"))
            return fut
        self._sent += 1
        timer = session.loop.call_later(
            self._config.publish_timeout_s, self._on_timeout, session, info.mid
        )
        session.pending[info.mid] = (fut, timer)
        return fut

    def _on_timeout(self, session: _Session, mid: int) -> None:
        entry = session.pending.pop(mid, None)
        if entry is None:
            return
        fut, _ = entry
        if not fut.done():
            fut.set_result(self._fail(TIMEOUT))
        session.end(f"no PUBACK within {self._config.publish_timeout_s} s")

    # ------------------------------------------------------------------ paho callbacks

    def _on_publish(
        self,
        session: _Session,
        mid: int,
        reason_code: ReasonCode,
    ) -> None:
        entry = session.pending.pop(mid, None)
        if entry is None:
            return
        fut, timer = entry
        timer.cancel()
        if reason_code.is_failure:
            result = self._fail(str(reason_code), reason_code.value)
        else:
            self._acked += 1
            result = PublishResult(ok=True)
        if not fut.done():
            fut.set_result(result)
        session.window_free.set()

    def _bind_callbacks(self, session: _Session) -> None:
        client = session.client
        loop = session.loop

        def on_connect(
            _c: mqtt.Client,
            _u: Any,
            _f: mqtt.ConnectFlags,
            reason_code: ReasonCode,
            properties: Properties | None,
        ) -> None:
            if not session.connack.done():
                session.connack.set_result((reason_code, properties))

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
            elif self._closing:
                reason = "closed"
            else:
                reason = "connection lost"
            session.end(reason)

        def on_publish(
            _c: mqtt.Client, _u: Any, mid: int, reason_code: ReasonCode, _p: Properties
        ) -> None:
            self._on_publish(session, mid, reason_code)

        def on_socket_close(_c: mqtt.Client, _u: Any, _s: Any) -> None:
            session.release_socket()

        def on_log(_c: mqtt.Client, _u: Any, level: int, buf: str) -> None:
            # paho turns socket errors into "connection lost" and keeps the cause only in
            # its log; a TLS alert (client certificate refused under TLS 1.3 arrives with
            # the first read) is worth reporting. paho never logs credentials.
            if level == mqtt.MQTT_LOG_ERR:
                session.last_error = buf

        def on_register_write(_c: mqtt.Client, _u: Any, _s: Any) -> None:
            if session.fd is not None and not session.writing:
                loop.add_writer(session.fd, self._guarded, session, client.loop_write)
                session.writing = True

        def on_unregister_write(_c: mqtt.Client, _u: Any, _s: Any) -> None:
            if session.fd is not None and session.writing:
                loop.remove_writer(session.fd)
                session.writing = False

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_socket_close = on_socket_close
        client.on_log = on_log
        client.on_socket_register_write = on_register_write
        client.on_socket_unregister_write = on_unregister_write

    # ------------------------------------------------------------------ connecting

    def _new_client(self) -> tuple[mqtt.Client, TrackingContext | None]:
        cfg = self._config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        client.connect_timeout = _CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(cfg.max_inflight)
        if cfg.username is not None:
            try:
                password = cfg.resolved_password()
            except OSError as exc:
                raise _ConnectFailed(
                    f"cannot read password_file: {exc.strerror or type(exc).__name__}"
                ) from None
            client.username_pw_set(cfg.username, password)
        ctx: TrackingContext | None = None
        if cfg.tls is not None:
            try:
                ctx = ssl_context(cfg.tls)
            except TlsSetupError as exc:
                raise _ConnectFailed(exc.reason) from None
            client.tls_set_context(ctx)
        will = self._will_factory() if self._will_factory is not None else self._will
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        return client, ctx

    async def _connect_once(self) -> _Session:
        """One attempt: TCP connect, CONNECT, wait for CONNACK. Raises _ConnectFailed."""
        cfg = self._config
        loop = asyncio.get_running_loop()
        client, ctx = self._new_client()

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
            raise _ConnectFailed(describe(exc, cfg.host)) from None
        except socket.gaierror as exc:
            raise _ConnectFailed(f"cannot resolve {cfg.host!r}: {exc.strerror}") from None
        except ConnectionRefusedError:
            raise _ConnectFailed("connection refused") from None
        except TimeoutError:
            raise _ConnectFailed(f"TCP connect timed out after {_CONNECT_TIMEOUT_S} s") from None
        except OSError as exc:
            raise _ConnectFailed(exc.strerror or f"{type(exc).__name__}: {exc}") from None
        sock = client.socket()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
            job.abandon()
            if cfg.tls is not None and errors:
                raise _ConnectFailed(describe_text(errors[-1]))
            raise _ConnectFailed(f"connect: {mqtt.error_string(rc)}")

        fd = sock.fileno()
        session = _Session(
            client=client,
            loop=loop,
            window=cfg.max_inflight,
            connack=loop.create_future(),
            ended=loop.create_future(),
            fd=fd,
            sock=sock,
        )
        self._bind_callbacks(session)
        loop.add_reader(fd, self._guarded, session, _reader(session))
        if client.want_write():
            loop.add_writer(fd, self._guarded, session, client.loop_write)
            session.writing = True
        session.misc_task = asyncio.create_task(self._misc(session), name="mqtt.keepalive")
        try:
            await asyncio.wait(
                (session.connack, session.ended),
                timeout=_CONNECT_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if session.connack.done():
                reason_code, properties = session.connack.result()
                if reason_code.is_failure:
                    raise _ConnectFailed(
                        f"broker refused: {reason_code} ({reason_code.value:#04x})"
                    )
                receive_max = getattr(properties, "ReceiveMaximum", None)
                if isinstance(receive_max, int) and receive_max > 0:
                    session.window = min(session.window, receive_max)
                max_packet = getattr(properties, "MaximumPacketSize", None)
                if isinstance(max_packet, int) and max_packet > 0:
                    session.max_packet = max_packet
                if session.open:
                    return session
            if session.ended.done():
                if cfg.tls is not None and session.last_error is not None:
                    raise _ConnectFailed(describe_text(session.last_error))
                raise _ConnectFailed(f"{session.ended.result()} before CONNACK")
            raise _ConnectFailed(f"no CONNACK within {_CONNECT_TIMEOUT_S} s")
        except BaseException:
            session.end("connect failed")
            self._retire(session)
            raise

    async def _misc(self, session: _Session) -> None:
        while session.open:
            await asyncio.sleep(_MISC_INTERVAL_S)
            if session.open:
                self._guarded(session, session.client.loop_misc)

    def _guarded(self, session: _Session, step: Callable[[], MQTTErrorCode]) -> None:
        """Run one paho I/O step; an unexpected error ends the connection instead of
        leaving a reader that fails on every event-loop turn."""
        try:
            step()
        except Exception as exc:
            self._log.exception("mqtt.paho.error")
            session.end(f"paho error: {type(exc).__name__}: {exc}")

    def _retire(self, session: _Session) -> None:
        """After the connection ended: fail what was not acknowledged, stop its tasks."""
        for fut, timer in session.pending.values():
            timer.cancel()
            if not fut.done():
                fut.set_result(self._fail(DISCONNECTED))
        session.pending.clear()
        session.window_free.set()
        if session.misc_task is not None and session.misc_task is not asyncio.current_task():
            session.misc_task.cancel()
        if self._session is session:
            self._session = None
            self._connected_since = None
            self._connected.clear()

    def _activate(self, session: _Session) -> None:
        """Connected: publish the birth messages first, then let publish() through."""
        self._session = session
        self._connected_since = time.time()
        self._connects += 1
        for topic_filter, qos, callback in self._subscriptions:
            self._subscribe(session, topic_filter, qos, callback)
        births: Sequence[Message] = ()
        if self._on_connect_messages is not None:
            try:
                births = self._on_connect_messages()
            except Exception:
                self._log.exception("mqtt.on_connect_messages.failed")
        for msg in births[: session.window]:
            fut = self._hand_over(session, msg)
            fut.add_done_callback(_log_birth_failure(self._log, msg.topic))
        if len(births) > session.window:
            self._log.warning(
                "mqtt.on_connect_messages.dropped", count=len(births) - session.window
            )
        self._connected.set()

    def _backoff(self, delay: float) -> float:
        """Jitter between half and all of the nominal delay."""
        return delay * (0.5 + 0.5 * self._rng.random())

    async def _run(self) -> None:
        cfg = self._config
        delay = cfg.reconnect_min_s
        last_failure: str | None = None
        while not self._closing:
            try:
                session = await self._connect_once()
            except _ConnectFailed as exc:
                self._connect_failures += 1
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
            self._activate(session)
            self._log.info("mqtt.connected", protocol=cfg.protocol, window=session.window)
            try:
                reason = await asyncio.shield(session.ended)
            finally:
                session.end("closed")
                self._retire(session)
            if self._closing:
                return
            self._disconnects += 1
            self._log.warning("mqtt.disconnected", reason=reason)
            await asyncio.sleep(self._backoff(delay))


def _reader(session: _Session) -> Callable[[], MQTTErrorCode]:
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


def _packet_size(msg: Message, *, v5: bool) -> int:
    """Size of the PUBLISH packet paho sends for msg (no properties, no topic alias)."""
    remaining = 2 + len(msg.topic.encode()) + (2 if msg.qos > 0 else 0) + len(msg.payload)
    if v5:
        remaining += 1  # empty property length
    varint = 1
    while remaining >= 128**varint:
        varint += 1
    return 1 + varint + remaining


def _log_birth_failure(logger: Any, topic: str) -> Callable[[asyncio.Future[PublishResult]], None]:
    def done(fut: asyncio.Future[PublishResult]) -> None:
        if fut.cancelled():
            return
        result = fut.result()
        if not result.ok:
            logger.warning("mqtt.birth.failed", topic=topic, reason=result.reason)

    return done


__all__ = ["DISCONNECTED", "NOT_CONNECTED", "TIMEOUT", "MqttPublisher", "PublisherStats"]
