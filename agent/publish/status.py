"""Retained status messages: is the agent online, is each device up.

Agent status (``mqtt.status_topic``, retained, QoS 1):

- ``online`` is published first on every connect (the birth), with the agent version, a
  hash of the effective config and the start time;
- ``offline`` is the MQTT will, so the broker publishes it when the connection dies
  without a DISCONNECT (crash, SIGKILL, power or network loss) — at the latest 1.5 ×
  keep-alive after the last packet; the agent also publishes it itself on a clean stop.

Device status (``mqtt.device_status_topic``, retained, QoS 1): ``up`` or ``down`` with the
reason and since when, published on each transition while connected and again, for every
device, after each connect (so a status that changed during an outage is not lost).

Pure code: builds Messages; the runtime hands them to the publisher.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from agent.config import AgentSection, MqttConfig
from agent.publish import Message

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

    @property
    def topic(self) -> str:
        return self._topic

    def set_config_hash(self, config_hash: str) -> None:
        """After a reload: later status messages name the config now running."""
        self._common["config_hash"] = config_hash

    def _agent(self, state: str, reason: str | None) -> Message:
        body = {**self._common, "state": state, "reason": reason}
        return Message(self._topic, orjson.dumps(body), qos=1, retain=True)

    def will(self) -> Message:
        """The offline message the broker publishes if the connection dies."""
        return self._agent("offline", "connection lost")

    def online(self) -> Message:
        return self._agent("online", None)

    def offline(self) -> Message:
        """Published by the agent itself when it stops cleanly."""
        return self._agent("offline", "shutdown")

    def birth(self) -> list[Message]:
        """After every connect: online first, then the last known status of each device."""
        return [self.online(), *self._devices.values()]

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
        msg = Message(topic, orjson.dumps(body), qos=1, retain=True)
        self._devices[device] = msg
        return msg


__all__ = ["DEVICE_STATUS_SCHEMA", "STATUS_SCHEMA", "StatusMessages"]
