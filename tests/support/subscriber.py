"""A paho-based MQTT subscriber that records what a broker delivers, for tests.

It runs paho's own network thread (`loop_start`), which is fine for a test helper; the
recorded messages are kept in a list guarded by a condition variable, so tests can wait
for them from any thread or from asyncio via `await asyncio.to_thread(sub.wait_for, ...)`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """Connects to host:port, subscribes to `topic_filter` at QoS 1, records messages.

    `start()` returns once the subscription is acknowledged, so anything published after
    that is seen. Use as a context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str = "#",
        *,
        username: str | None = None,
        password: str | None = None,
        protocol: Literal["5", "3.1.1"] = "5",
        client_id: str = "",
        timeout_s: float = 10.0,
        session_expiry_s: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.client_id = client_id
        self._timeout_s = timeout_s
        # A persistent session (MQTT 5, needs a client_id): the broker queues QoS 1
        # messages for us while we are disconnected, across a broker restart too when the
        # broker has persistence on.
        self._session_expiry_s = session_expiry_s
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._started = False

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # paho's thread reconnects by itself; on_connect subscribes again.
        self._subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    # ------------------------------------------------------------------ API

    def start(self) -> Subscriber:
        """Connect and subscribe; raises TimeoutError if not subscribed in time."""
        if self._session_expiry_s is None:
            self._client.connect(self.host, self.port, keepalive=30)
        else:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry_s
            self._client.connect(
                self.host, self.port, keepalive=30, clean_start=False, properties=props
            )
        # paho backs off up to 120 s between reconnects by default: after a broker outage
        # the subscriber would stay away long after the broker is back, and the broker's
        # queue for its session (max_queued_messages) would overflow.
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._client.loop_start()
        self._started = True
        if not self._subscribed.wait(self._timeout_s):
            self.close()
            raise TimeoutError(f"no SUBACK from {self.host}:{self.port} for {self.topic_filter}")
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread. Safe to call more than once."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()

    def wait_subscribed(self, timeout_s: float = 10.0) -> None:
        """Wait until subscribed (again, after the broker restarted)."""
        if not self._subscribed.wait(timeout_s):
            raise TimeoutError(f"not subscribed to {self.topic_filter} within {timeout_s} s")

    def messages(self) -> list[Received]:
        """A copy of every message received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages()]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0
    ) -> list[Received]:
        """Wait until `predicate(messages)` is true; returns the messages then.

        Raises TimeoutError (with what was received) when it stays false."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"condition not met within {timeout_s} s; received "
                        f"{len(self._messages)}: {self._messages[-5:]!r}"
                    )
                self._cond.wait(left)
            return list(self._messages)

    def wait_count(self, n: int, timeout_s: float = 10.0) -> list[Received]:
        """Wait until at least n messages arrived."""
        return self.wait_for(lambda msgs: len(msgs) >= n, timeout_s)

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
