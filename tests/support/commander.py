"""An MQTT 5 requester for tests: what a platform sends to the agent's command topic.

paho-mqtt with its own network thread. `request()` publishes one write request with a
response topic, correlation data and user properties (optionally an HMAC signature, as
docs/commands.md shows) and returns the result message that carries the same
correlation data. Every audit record published on `audit_topic` is kept in `audits`."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.command.signing import sign


class Commander:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        command_topic: str,
        audit_topic: str,
        response_topic: str = "platform/results",
        timeout_s: float = 20.0,
    ) -> None:
        self.command_topic = command_topic
        self.audit_topic = audit_topic
        self.response_topic = response_topic
        self.timeout_s = timeout_s
        self.results: dict[bytes, list[dict[str, Any]]] = {}
        self.audits: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"platform-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise TimeoutError("no SUBACK")

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        client.subscribe([(self.response_topic, 1), (self.audit_topic, 1)])

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self._cond:
            if msg.topic == self.audit_topic:
                self.audits.append(body)
            else:
                corr = getattr(msg.properties, "CorrelationData", None) or b""
                self.results.setdefault(bytes(corr), []).append(body)
            self._cond.notify_all()

    def send(
        self,
        body: dict[str, Any] | bytes,
        *,
        correlation: bytes | None,
        key: bytes | None = None,
        user: str | None = "operator-7",
        signature: str | None = None,
    ) -> bytes:
        """Publish one request; returns the exact payload bytes sent."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.response_topic
        users: list[tuple[str, str]] = [("client_id", "mes-line4")]
        if user is not None:
            users.append(("user", user))
        if correlation is not None:
            props.CorrelationData = correlation
            if key is not None:
                signature = sign(key, correlation, payload)
        if signature is not None:
            users.append(("signature", signature))
        props.UserProperty = users
        info = self._client.publish(self.command_topic, payload, qos=1, properties=props)
        info.wait_for_publish(self.timeout_s)
        return payload

    def request(self, body: dict[str, Any], *, n: int = 1, **kw: Any) -> dict[str, Any]:
        """Send and wait for the result (the n-th one with this correlation data)."""
        correlation: bytes = kw.pop("correlation", None) or uuid.uuid4().bytes
        self.send(body, correlation=correlation, **kw)
        return self.wait_result(correlation, n=n)

    def wait_result(self, correlation: bytes, *, n: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while len(self.results.get(correlation, [])) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for {correlation!r}")
                self._cond.wait(left)
            return self.results[correlation][n - 1]

    def wait_audits(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while len(self.audits) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.audits)} audit records, wanted {count}")
                self._cond.wait(left)
            return list(self.audits)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
