"""Retained status messages: is the agent online, is each device up.

Agent status (``mqtt.status_topic``, retained, QoS 1):

- ``online`` is published first on every connect (the birth), with the agent version, a
  hash of the effective config and the start time;
- ``offline`` is the MQTT will, so the broker publishes it when the connection dies
  without a DISCONNECT (crash, SIGKILL, power or network loss) — at the latest 1.5 ×
  keep-alive after the last packet; the agent also publishes it itself on a clean stop.

Device status (``mqtt.device_status_topic``, retained, QoS 1): ``up`` or ``down`` with the
reason and since when, published on each transition and again, for every device, after
each connect (so a status that changed during an outage is not lost). A device removed by a
reload gets its retained status cleared (an empty retained message on its topic).

Platforms without retained messages or wills (``mqtt.profile: azure-iot-hub``, see
agent.publish.cloud): the same messages go out **not retained** — ``online`` after every
connect, device statuses after every connect and on each transition, ``offline`` on a
clean stop — and there is **no will**, so a consumer learns of a lost connection from the
platform (IoT Hub's device connection state), not from us. A removed device gets a
``{"state": "removed"}`` message instead of an empty retained one. These messages are
marked ``msg-type=status`` / ``device-status`` in the message properties.

`StatusMessages` is pure code that builds the messages. `DeviceStatusSync` is the task
that delivers them: it keeps the newest message per topic until the broker acknowledged it
(retrying with backoff while it fails, dropping a message only when a newer one for the
same topic supersedes it) and sends all of them again after every connect, through
`Publisher.publish`, which keeps to the broker's Receive Maximum — so the statuses are
complete however many devices there are.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import structlog

from agent.config import AgentSection, MqttConfig
from agent.poller import Backoff
from agent.publish import Message, Publisher, cloud

log = structlog.get_logger()

STATUS_SCHEMA = "edge-agent/status/1"
DEVICE_STATUS_SCHEMA = "edge-agent/device-status/1"

DeviceState = Literal["up", "down"]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


class StatusMessages:
    """Builds the agent's and the devices' status messages and remembers device states."""

    def __init__(
        self,
        agent: AgentSection,
        mqtt: MqttConfig,
        *,
        version: str,
        config_hash: str,
        started: float,
    ) -> None:
        self._fields = {
            "agent": agent.id,
            "site": agent.site,
            "area": agent.area,
            "line": agent.line,
        }
        self._mqtt = mqtt
        self._topic = mqtt.status_topic.format(**self._fields)
        self._common: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "agent": agent.id,
            "version": version,
            "config_hash": config_hash,
            "started": _iso(started),
        }
        self._devices: dict[str, Message] = {}
        self._retain = cloud.allows_retain(mqtt.profile)
        self._will = cloud.allows_will(mqtt.profile)

    @property
    def topic(self) -> str:
        return self._topic

    def set_config_hash(self, config_hash: str) -> None:
        """After a reload: later status messages name the config now running."""
        self._common["config_hash"] = config_hash

    def _agent(self, state: str, reason: str | None) -> Message:
        body = {**self._common, "state": state, "reason": reason}
        return Message(self._topic, orjson.dumps(body), qos=1, retain=self._retain)

    def will(self) -> Message | None:
        """The offline message the broker publishes if the connection dies; None where
        the platform takes no will (azure-iot-hub)."""
        if not self._will:
            return None
        return self._agent("offline", "connection lost")

    def online(self) -> Message:
        return self._agent("online", None)

    def offline(self) -> Message:
        """Published by the agent itself when it stops cleanly."""
        return self._agent("offline", "shutdown")

    def birth(self) -> list[Message]:
        """After every connect: online. The devices' statuses follow through
        `DeviceStatusSync` (a birth is limited to the broker's window)."""
        return [self.online()]

    def devices(self) -> list[Message]:
        """The last known status message of every device."""
        return list(self._devices.values())

    def removed(self, device: str) -> Message:
        """The device is gone (a reload removed it): an empty retained message clears its
        status on the broker, and it is no longer re-sent after a connect."""
        self._devices.pop(device, None)
        topic = self._mqtt.device_status_topic.format(**self._fields, device=device)
        if not self._retain:
            body = {"schema": DEVICE_STATUS_SCHEMA, "agent": self._common["agent"]}
            body |= {"device": device, "state": "removed"}
            return Message(topic, orjson.dumps(body), qos=1, retain=False)
        return Message(topic, b"", qos=1, retain=True)

    def device(self, device: str, state: DeviceState, reason: str | None, since: float) -> Message:
        """Record a device transition; returns its message."""
        body = {
            "schema": DEVICE_STATUS_SCHEMA,
            "agent": self._common["agent"],
            "device": device,
            "state": state,
            "reason": reason,
            "since": _iso(since),
        }
        topic = self._mqtt.device_status_topic.format(**self._fields, device=device)
        msg = Message(topic, orjson.dumps(body), qos=1, retain=self._retain)
        self._devices[device] = msg
        return msg


class DeviceStatusSync:
    """Delivers retained status messages until acknowledged or superseded (module doc)."""

    def __init__(
        self,
        messages: StatusMessages,
        publisher: Publisher,
        *,
        retry_min_s: float = 0.5,
        retry_max_s: float = 10.0,
        session_check_s: float = 1.0,
    ) -> None:
        self._messages = messages
        self._publisher = publisher
        self._pending: dict[str, Message] = {}  # topic → newest message not acknowledged
        self._wake = asyncio.Event()
        self._session: float | None = None
        self._backoff = Backoff(retry_min_s, retry_max_s)
        self._session_check_s = session_check_s
        self._failing = False
        self.delivered = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(self, message: Message) -> None:
        """Deliver `message`, superseding any undelivered one for the same topic."""
        self._pending[message.topic] = message
        self._wake.set()

    async def run(self) -> None:
        publisher = self._publisher
        while True:
            await publisher.wait_connected()
            since = publisher.connected_since
            if since is not None and since != self._session:
                self._session = since
                for msg in self._messages.devices():
                    self._pending.setdefault(msg.topic, msg)
            if not self._pending:
                self._wake.clear()
                # Woken by a new message, or soon enough to notice a new session.
                try:
                    async with asyncio.timeout(self._session_check_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            batch = list(self._pending.values())
            results = await publisher.publish(batch)
            failed = None
            for msg, result in zip(batch, results, strict=True):
                if result.ok:
                    self.delivered += 1
                    if self._pending.get(msg.topic) is msg:
                        del self._pending[msg.topic]
                else:
                    self.failed += 1
                    failed = failed or result
            if failed is None:
                if self._failing:
                    log.info("status.publish.recovered")
                self._failing = False
                self._backoff.reset()
                continue
            if not self._failing:
                log.warning(
                    "status.publish.failed",
                    reason=failed.reason,
                    code=failed.code,
                    pending=len(self._pending),
                    note="sent again until acknowledged",
                )
                self._failing = True
            await asyncio.sleep(self._backoff.next())


__all__ = ["DEVICE_STATUS_SCHEMA", "STATUS_SCHEMA", "DeviceStatusSync", "StatusMessages"]
