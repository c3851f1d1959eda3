"""Buffered records → MQTT messages, in the configured layout. Pure code.

Device layout: the record's stored bytes already are the JSON array of samples, so the
message is a small per-device prefix, those bytes, and a closing part: nothing is
decoded or re-encoded on the way out.

Every JSON payload names the buffer's ``epoch`` next to ``agent``: the pair with a
sample's ``seq`` is the consumer's deduplication key, unique across restarts, lost or
replaced buffer files and reinstalls (see docs/mqtt.md).

Two optional members mark what a consumer must know about a message (see docs/mqtt.md):

- ``"historical": true`` — the record is backlog, not live data: it was appended before
  the current broker connection came up, or an earlier attempt to publish it failed.
  Absent (false) for live data. Consumers that drive dashboards or alarms from the latest
  value should ignore historical messages for that purpose; historians store both.
- ``"gaps": [{"first_seq", "last_seq", "count", "reason"}]`` — seq ranges the agent
  dropped (buffer full, too large, corrupt file, ...). Carried by the next message
  published after the drop, until one carrying it was acknowledged.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from agent.buffer import Gap, Record
from agent.buffer.common import record_json, record_samples
from agent.config import AgentSection, MqttConfig
from agent.publish import Message
from agent.publish.sparkplug import SparkplugNode
from agent.schema import BATCH_SCHEMA, SAMPLE_SCHEMA


def _gap_list(gaps: Sequence[Gap], epoch: str) -> list[dict[str, Any]]:
    """Gap notices; a gap of another epoch than the message's says which."""
    out = []
    for g in gaps:
        item: dict[str, Any] = {
            "first_seq": g.first_seq,
            "last_seq": g.last_seq,
            "count": g.count,
            "reason": g.reason,
        }
        if g.epoch and g.epoch != epoch:
            item["epoch"] = g.epoch
        out.append(item)
    return out


class PayloadError(ValueError):
    """A record that cannot be turned into messages (its stored bytes are not a JSON
    array of samples): no attempt will ever succeed, so the caller sets it aside."""


class PayloadEncoder:
    """sparkplug: the edge node used by layout sparkplug (default: one whose bdSeq lives
    in memory only; the runtime passes the one wired to the publisher).

    epoch: the buffer's epoch, put into every JSON payload. Default: a random id made
    here, which is a new epoch for every encoder (every start of the agent): (agent,
    epoch, seq) then stays unique, but a record re-sent after a restart is not
    recognisable as a duplicate. The runtime passes the buffer's epoch."""

    def __init__(
        self,
        agent: AgentSection,
        mqtt: MqttConfig,
        *,
        sparkplug: SparkplugNode | None = None,
        epoch: str | None = None,
    ) -> None:
        self._agent = agent
        self._mqtt = mqtt
        self.epoch = epoch if epoch is not None else uuid.uuid4().hex
        if sparkplug is None and mqtt.layout == "sparkplug":
            sparkplug = SparkplugNode(agent, mqtt)
        self.sparkplug = sparkplug
        #: encode() may return no message for a record only in the Sparkplug layout (its
        #: backlog: drop, or data of a device declared dead); the forwarder treats an
        #: empty result from any other layout as a record that cannot be sent.
        self.may_skip = sparkplug is not None
        self._fields: dict[str, str | None] = {
            "agent": agent.id,
            "site": agent.site,
            "area": agent.area,
            "line": agent.line,
        }
        self._prefix: dict[tuple[str, str], tuple[str, bytes]] = {}

    def topic(self, device: str, tag: str | None = None) -> str:
        if tag is None:
            return self._mqtt.topic.format(**self._fields, device=device)
        return self._mqtt.topic_tag.format(**self._fields, device=device, tag=tag)

    def encode(
        self, record: Record, *, historical: bool = False, gaps: Sequence[Gap] = ()
    ) -> list[Message]:
        """The messages that carry one record. `gaps` go into the first message."""
        if self._mqtt.layout == "device":
            return [self._device_message(record, historical, gaps)]
        if self.sparkplug is not None:
            # Sparkplug has no place for gap notices; docs/sparkplug.md says so.
            return self.sparkplug.encode(record, historical=historical)
        return self._tag_messages(record, historical, gaps)

    def _device_message(self, record: Record, historical: bool, gaps: Sequence[Gap]) -> Message:
        # A record keeps the epoch it was stored in (a buffer that got a new epoch
        # still holds records of the old one): its identity must not change on resend.
        epoch = record.epoch or self.epoch
        key = (record.device, epoch)
        cached = self._prefix.get(key)
        if cached is None:
            head: dict[str, Any] = {
                "schema": BATCH_SCHEMA,
                "agent": self._agent.id,
                "epoch": epoch,
                **self._fields,
                "device": record.device,
            }
            prefix = orjson.dumps(head)[:-1] + b',"samples":'
            cached = (self.topic(record.device), prefix)
            self._prefix[key] = cached
        topic, prefix = cached
        tail = b"}"
        if historical or gaps:
            extra: dict[str, Any] = {}
            if historical:
                extra["historical"] = True
            if gaps:
                extra["gaps"] = _gap_list(gaps, epoch)
            tail = b"," + orjson.dumps(extra)[1:]
        return Message(topic=topic, payload=prefix + record_json(record.data) + tail)

    def _tag_messages(self, record: Record, historical: bool, gaps: Sequence[Gap]) -> list[Message]:
        samples = _samples_of(record)
        # A retained historical value would replace a newer retained one.
        retain = self._mqtt.retain_last and not historical
        out = []
        epoch = record.epoch or self.epoch
        for i, s in enumerate(samples):
            body: dict[str, Any] = {
                "schema": SAMPLE_SCHEMA,
                "agent": self._agent.id,
                "epoch": epoch,
                **s,
            }
            if historical:
                body["historical"] = True
            if gaps and i == 0:
                body["gaps"] = _gap_list(gaps, epoch)
            out.append(
                Message(
                    topic=self.topic(record.device, s["tag"]),
                    payload=orjson.dumps(body),
                    retain=retain,
                )
            )
        return out


def _samples_of(record: Record) -> list[dict[str, Any]]:
    """The samples of a record, or PayloadError naming the record."""
    try:
        samples: Any = record_samples(record.data)
    except ValueError as exc:
        raise PayloadError(f"record {record.id} ({record.device}): {exc}") from None
    if not isinstance(samples, list) or not all(
        isinstance(s, dict) and isinstance(s.get("tag"), str) for s in samples
    ):
        raise PayloadError(f"record {record.id} ({record.device}): not a JSON array of samples")
    return samples
