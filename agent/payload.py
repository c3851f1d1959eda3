"""Buffered records → MQTT messages, in the configured layout. Pure code.

Device layout: the record's stored bytes already are the JSON array of samples, so the
message is a small per-device prefix, those bytes, and a closing brace: nothing is
decoded or re-encoded on the way out.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.buffer import Record
from agent.config import AgentSection, MqttConfig
from agent.publish import Message
from agent.schema import BATCH_SCHEMA, SAMPLE_SCHEMA


class PayloadEncoder:
    def __init__(self, agent: AgentSection, mqtt: MqttConfig) -> None:
        self._agent = agent
        self._mqtt = mqtt
        self._fields: dict[str, str | None] = {
            "agent": agent.id,
            "site": agent.site,
            "area": agent.area,
            "line": agent.line,
        }
        self._prefix: dict[str, tuple[str, bytes]] = {}

    def topic(self, device: str, tag: str | None = None) -> str:
        if tag is None:
            return self._mqtt.topic.format(**self._fields, device=device)
        return self._mqtt.topic_tag.format(**self._fields, device=device, tag=tag)

    def encode(self, record: Record) -> list[Message]:
        """The messages that carry one record."""
        if self._mqtt.layout == "device":
            return [self._device_message(record)]
        return self._tag_messages(record)

    def _device_message(self, record: Record) -> Message:
        cached = self._prefix.get(record.device)
        if cached is None:
            head: dict[str, Any] = {"schema": BATCH_SCHEMA, **self._fields, "device": record.device}
            prefix = orjson.dumps(head)[:-1] + b',"samples":'
            cached = (self.topic(record.device), prefix)
            self._prefix[record.device] = cached
        topic, prefix = cached
        return Message(topic=topic, payload=prefix + record.data + b"}")

    def _tag_messages(self, record: Record) -> list[Message]:
        samples: list[dict[str, Any]] = orjson.loads(record.data)
        return [
            Message(
                topic=self.topic(record.device, s["tag"]),
                payload=orjson.dumps({"schema": SAMPLE_SCHEMA, "agent": self._agent.id, **s}),
            )
            for s in samples
        ]
