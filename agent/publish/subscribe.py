"""The consumer side: a subscription whose messages are acknowledged only when the
caller says so (the collector, once they are on disk), and `export --broker`.

- **Manual acknowledgement** (QoS 1): paho acknowledges a message only when `ack()` is
  called for it, in the order received. A message received but never acknowledged (the
  process died before its fsync) is delivered again by the broker, to this client id's
  session or, for a shared subscription, to another member.
- **Persistent session** (MQTT 5, `session_expiry_s` > 0, a fixed client id): the broker
  keeps the subscription and queues QoS 1 messages while the consumer is away (a restart,
  an upgrade), up to its own limits (mosquitto: `max_queued_messages`).
- **Shared subscriptions**: a filter ``$share/GROUP/FILTER`` spreads the messages over
  every client subscribed with the same GROUP (MQTT 5; mosquitto ≥ 1.6). Each member
  needs its own client id.

It connects as `edge-agent watch` does: the config's credentials and `mqtt.tls` through
agent.publish.tls. paho runs its own network thread; `get()` hands messages over.
"""

from __future__ import annotations

import queue
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.publish.tls import TlsSetupError, describe, ssl_context


class SubscribeError(RuntimeError):
    """The subscription could not be made (connection, login, TLS, refused filter)."""


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection it came on: a mid is only valid on that one


class Subscription:
    """Subscribe `topics` at QoS 1 on the broker of `config`. `start()` returns once the
    broker acknowledged the subscription (or raises SubscribeError)."""

    def __init__(
        self,
        config: MqttConfig,
        topics: list[str],
        *,
        client_id: str,
        session_expiry_s: int = 0,
        manual_ack: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        self._config = config
        self._topics = topics
        self._client_id = client_id
        self._expiry = session_expiry_s
        self._manual = manual_ack
        self._timeout_s = timeout_s
        self._inbox: queue.Queue[Incoming] = queue.Queue()
        self._subscribed = threading.Event()
        self._problem: list[str] = []
        self.connected = threading.Event()
        self._connection = 0
        version = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=version,
            manual_ack=manual_ack,
            clean_session=None if version == mqtt.MQTTv5 else session_expiry_s == 0,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._started = False

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            self._problem.append(f"broker refused the connection: {reason}")
            self._subscribed.set()
            return
        self._connection += 1
        self.connected.set()
        c.subscribe([(t, 1) for t in self._topics])

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, codes: list[Any], p: Any) -> None:
        refused = [
            f"{t}: {code}"
            for t, code in zip(self._topics, codes, strict=False)
            if getattr(code, "is_failure", False)
        ]
        if refused:
            self._problem.append(f"subscription refused: {', '.join(refused)}")
        self._subscribed.set()

    def _on_disconnect(self, c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        self.connected.clear()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._connection))

    # ------------------------------------------------------------------ API

    def start(self) -> Subscription:
        config = self._config
        if config.username is not None:
            try:
                password = config.resolved_password()
            except OSError as exc:
                raise SubscribeError(f"cannot read password_file: {exc.strerror or exc}") from None
            self._client.username_pw_set(config.username, password)
        if config.tls is not None:
            try:
                self._client.tls_set_context(ssl_context(config.tls))
            except TlsSetupError as exc:
                raise SubscribeError(f"TLS: {exc.reason}") from None
        where = f"{config.host}:{config.port}"
        props = None
        kwargs: dict[str, Any] = {}
        if config.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._expiry
            kwargs = {"clean_start": self._expiry == 0, "properties": props}
        try:
            self._client.connect(config.host, config.port, keepalive=config.keepalive_s, **kwargs)
        except ssl.SSLError as exc:
            raise SubscribeError(
                f"cannot connect to {where}: {describe(exc, config.host)}"
            ) from None
        except OSError as exc:
            raise SubscribeError(f"cannot connect to {where}: {exc}") from None
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.loop_start()
        self._started = True
        if not self._subscribed.wait(self._timeout_s):
            self.close()
            raise SubscribeError(f"no answer from {where} within {self._timeout_s} s")
        if self._problem:
            self.close()
            raise SubscribeError(self._problem[0])
        return self

    def get(self, timeout_s: float) -> Incoming | None:
        """The next message, or None after `timeout_s`."""
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def ack(self, message: Incoming) -> None:
        """Acknowledge a message (manual_ack): the broker forgets it. A message of an
        earlier connection is not acknowledged (its mid means nothing on this one): the
        broker delivers it again, and the collector drops the copy as a duplicate."""
        if self._manual and message.qos > 0 and message.connection == self._connection:
            self._client.ack(message.mid, message.qos)

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()
