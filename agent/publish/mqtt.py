"""MQTT publisher: messages, the in-flight window and one result per message.

The connection itself — paho driven from the event loop, connect and reconnect, CONNACK
properties — is agent.publish.session; this module decides what is sent on it:

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
  connection dropped (and every retry with it). `max_packet_size` exposes the limit so
  the forwarder can split batches to fit.
- **Publish rate.** Where the platform limits publishes per connection (AWS IoT Core:
  100/s) or ``mqtt.max_publishes_per_s`` is set, a token bucket per connection makes
  ``publish()`` wait before handing paho the next message; nothing is dropped, the
  forwarder's round just takes longer and the buffer holds what waits
  (agent.publish.cloud).
- A message paho rejects (``ValueError``: a topic with ``+``/``#``, an oversize payload)
  fails at once with ``permanent=True``; the connection stays up.
- MQTT 5 PUBACK reason codes ≥ 0x80 (e.g. 0x87 Not authorized, what mosquitto answers for a
  topic its ACL denies) are failures; below 0x80 (0x10 No matching subscribers) success.
  A refusal concerns that message only: the connection stays up and the other messages
  in flight are unaffected. With MQTT 3.1.1 mosquitto acknowledges a denied publish as a
  success: prefer MQTT 5.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.publish import PACKET_TOO_LARGE, Message, PublishResult, packet_size
from agent.publish.cloud import TokenBucket, publish_rate
from agent.publish.session import ConnectFailed, Connector, Session, connect

log = structlog.get_logger()

NOT_CONNECTED = "not connected"
DISCONNECTED = "disconnected before ack"
TIMEOUT = "timeout"
TOO_LARGE = "Packet too large"

# How long close() waits for DISCONNECT to be written before dropping the socket.
_CLOSE_TIMEOUT_S = 2.0


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
    max_packet_size: int | None = None  # the broker's, from the MQTT 5 CONNACK
    renewals: int = 0  # planned reconnects with fresh credentials (Azure SAS tokens)


@dataclass(eq=False)
class _Link:
    """What the publisher sent on one session."""

    session: Session
    window: int
    pending: dict[int, tuple[asyncio.Future[PublishResult], asyncio.TimerHandle]] = field(
        default_factory=dict
    )
    window_free: asyncio.Event = field(default_factory=asyncio.Event)
    #: Publishes per second on this connection (mqtt.max_publishes_per_s / the profile).
    bucket: TokenBucket | None = None

    @property
    def open(self) -> bool:
        return self.session.open


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
        self._prepare = prepare
        self._subscriptions: list[tuple[str, int, Callable[[str, bytes], None]]] = []
        self._on_connect_messages = on_connect_messages
        self._link: _Link | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._sent = 0
        self._acked = 0
        self._failed: dict[str, int] = {}
        self._log = log.bind(broker=f"{config.host}:{config.port}", client_id=client_id)
        self._connector = Connector(
            config,
            client_id,
            on_up=self._activate,
            on_down=self._retire,
            will_factory=will_factory if will_factory is not None else (lambda: will),
            log_fields={"broker": f"{config.host}:{config.port}", "client_id": client_id},
        )

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up (CONNACK received, not yet lost)."""
        link = self._link
        return link is not None and link.open

    @property
    def connected_since(self) -> float | None:
        """Epoch seconds when the current session came up; None while disconnected."""
        return self._connector.connected_since if self.connected else None

    @property
    def max_packet_size(self) -> int | None:
        """The largest packet the broker accepts (MQTT 5 CONNACK), None when it did not
        say or while disconnected."""
        link = self._link
        return link.session.max_packet_size if link is not None and link.open else None

    async def wait_connected(self) -> None:
        """Return once connected (at once if connected)."""
        await self._connected.wait()

    async def run(self) -> None:
        """The connection loop (connect, wait for the session's end, reconnect with
        backoff) until close(): for a supervisor to run instead of start(), so that an
        unexpected exception in it is seen and the loop restarted."""
        if not self._closing:
            await self._connector.run()

    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._connector.run(), name="mqtt.publisher")

    async def connect_once(self) -> str | None:
        """One connection attempt, without the reconnect loop (`edge-agent doctor`): None
        once connected (publish() then works until close()), else why not. No will."""
        try:
            session = await connect(self._config, self._client_id)
        except ConnectFailed as exc:
            return exc.reason
        self._activate(session)
        return None

    async def close(self) -> None:
        """Send DISCONNECT (if connected), stop reconnecting, fail what is still unacked.

        Never raises; a cancellation of the caller still propagates."""
        self._closing = True
        self._connector.closing = True
        link = self._link
        try:
            if link is not None and link.open:
                link.session.disconnect()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                        await asyncio.shield(link.session.ended)
        finally:
            if link is not None:
                link.session.end("closed")
                self._retire(link.session, "closed")
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
        link = self._link
        if link is not None and link.open:
            link.session.subscribe(topic_filter, qos, callback)

    def stats(self) -> PublisherStats:
        link = self._link
        c = self._connector
        return PublisherStats(
            connected=self.connected,
            connects=c.connects,
            disconnects=c.disconnects,
            connect_failures=c.connect_failures,
            sent=self._sent,
            acked=self._acked,
            failed=dict(self._failed),
            inflight=len(link.pending) if link is not None else 0,
            window=link.window if link is not None else 0,
            max_packet_size=self.max_packet_size,
            renewals=c.renewals,
        )

    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]:
        """Send every message and return one result per message, in order, once each is
        acknowledged or has failed. Never raises for broker or network trouble."""
        link = self._link
        if link is None or not link.open or self._closing:
            return [self._fail(NOT_CONNECTED) for _ in messages]
        futures: list[asyncio.Future[PublishResult]] = []
        for msg in messages:
            while link.open and len(link.pending) >= link.window:
                link.window_free.clear()
                await link.window_free.wait()
            if link.bucket is not None and (wait := link.bucket.delay()) > 0:
                # A platform's publish rate (AWS IoT Core): messages wait, none is dropped.
                # One wait suffices: only births, sent at connect, take without waiting.
                await asyncio.sleep(wait)
            if not link.open:
                break
            futures.append(self._hand_over(link, msg))
        results = [await fut for fut in futures]
        results += [self._fail(NOT_CONNECTED) for _ in messages[len(futures) :]]
        return results

    # ------------------------------------------------------------------ sending

    def _fail(
        self, reason: str, code: int | None = None, *, permanent: bool = False
    ) -> PublishResult:
        self._failed[reason] = self._failed.get(reason, 0) + 1
        return PublishResult(ok=False, reason=reason, code=code, permanent=permanent)

    def _hand_over(self, link: _Link, msg: Message) -> asyncio.Future[PublishResult]:
        """Give one message to paho (the window must have room); its future resolves on
        PUBACK, timeout or the end of the connection."""
        session = link.session
        fut: asyncio.Future[PublishResult] = session.loop.create_future()
        if self._prepare is not None:
            msg = self._prepare(msg)
        limit = session.max_packet_size
        if limit is not None and packet_size(msg, v5=True) > limit:
            # The broker would drop the connection over it, and every retry would too.
            fut.set_result(self._fail(TOO_LARGE, PACKET_TOO_LARGE))
            return fut
        try:
            rc, mid = session.publish(msg)
        except ValueError as exc:  # invalid topic, QoS or payload size: never deliverable
            fut.set_result(self._fail(f"invalid message: {exc}", permanent=True))
            return fut
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_result(self._fail(f"paho: {mqtt.error_string(rc)}"))
            return fut
        self._sent += 1
        if link.bucket is not None:
            link.bucket.take()
        timer = session.loop.call_later(self._config.publish_timeout_s, self._on_timeout, link, mid)
        link.pending[mid] = (fut, timer)
        return fut

    def _on_timeout(self, link: _Link, mid: int) -> None:
        entry = link.pending.pop(mid, None)
        if entry is None:
            return
        fut, _ = entry
        if not fut.done():
            fut.set_result(self._fail(TIMEOUT))
        link.session.end(f"no PUBACK within {self._config.publish_timeout_s} s")

    def _on_puback(self, link: _Link, mid: int, reason_code: ReasonCode) -> None:
        entry = link.pending.pop(mid, None)
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
        link.window_free.set()

    # ------------------------------------------------------------------ connection events

    def _activate(self, session: Session) -> None:
        """Connected: publish the birth messages first, then let publish() through."""
        window = self._config.max_inflight
        if session.receive_maximum is not None:
            window = min(window, session.receive_maximum)
        link = self._link = _Link(session, window)
        rate = publish_rate(self._config.profile, self._config.max_publishes_per_s)
        if rate is not None:
            link.bucket = TokenBucket(*rate)
        session.on_puback = lambda mid, rc: self._on_puback(link, mid, rc)
        session.on_end = lambda _reason: link.window_free.set()
        for topic_filter, qos, callback in self._subscriptions:
            session.subscribe(topic_filter, qos, callback)
        births: Sequence[Message] = ()
        if self._on_connect_messages is not None:
            try:
                births = self._on_connect_messages()
            except Exception:
                self._log.exception("mqtt.on_connect_messages.failed")
        for msg in births[:window]:
            fut = self._hand_over(link, msg)
            fut.add_done_callback(_log_birth_failure(self._log, msg.topic))
        if len(births) > window:
            self._log.warning("mqtt.on_connect_messages.dropped", count=len(births) - window)
        self._log.info("mqtt.connected", protocol=self._config.protocol, window=window)
        self._connected.set()

    def _retire(self, session: Session, _reason: str) -> None:
        """After the connection ended: fail what was not acknowledged."""
        link = self._link
        if link is None or link.session is not session:
            return
        for fut, timer in link.pending.values():
            timer.cancel()
            if not fut.done():
                fut.set_result(self._fail(DISCONNECTED))
        link.pending.clear()
        link.window_free.set()
        self._link = None
        self._connected.clear()


def _log_birth_failure(logger: Any, topic: str) -> Callable[[asyncio.Future[PublishResult]], None]:
    def done(fut: asyncio.Future[PublishResult]) -> None:
        if fut.cancelled():
            return
        result = fut.result()
        if not result.ok:
            logger.warning("mqtt.birth.failed", topic=topic, reason=result.reason)

    return done


__all__ = [
    "DISCONNECTED",
    "NOT_CONNECTED",
    "TIMEOUT",
    "TOO_LARGE",
    "MqttPublisher",
    "PublisherStats",
]
