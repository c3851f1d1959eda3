"""Buffered records → MQTT messages, in the configured layout (`mqtt.layout`). Pure code.

The layouts themselves live in `agent.layouts` (one module each; Sparkplug B in
`agent.publish.sparkplug`); this is the one object the forwarder talks to. The layouts
and their payloads are described for the cloud side in docs/layouts.md, and
`agent.layouts.decode` is their reference decoder.

Every JSON payload names the buffer's ``epoch`` next to ``agent``: the pair with a
sample's ``seq`` is the consumer's deduplication key, unique across restarts, lost or
replaced buffer files and reinstalls (see docs/mqtt.md).

Two optional members mark what a consumer must know about a message (see docs/mqtt.md):

- ``"historical": true`` — the record is backlog, not live data: it was appended before
  the current broker connection came up, or an earlier attempt to publish it failed.
- ``"gaps": [{"first_seq", "last_seq", "count", "reason"}]`` — seq ranges the agent
  dropped (buffer full, too large, corrupt file, ...). Carried by the next message
  published after the drop, until one carrying it was acknowledged.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from agent.buffer import Gap, Record
from agent.buffer.record import DICT_MAGIC, RecordColumns, record_columns
from agent.config import AgentSection, MqttConfig
from agent.layouts import compact, lean, verbose
from agent.layouts.common import Origin, PayloadError, samples_of
from agent.publish import Message, packet_size
from agent.publish.cloud import allows_retain
from agent.publish.sparkplug import SparkplugNode

__all__ = ["PayloadEncoder", "PayloadError"]


class PayloadEncoder:
    """sparkplug: the edge node used by layout sparkplug (default: one whose bdSeq lives
    in memory only; the runtime passes the one wired to the publisher).

    epoch: the buffer's epoch, put into every JSON payload. Default: a random id made
    here, which is a new epoch for every encoder (every start of the agent): (agent,
    epoch, seq) then stays unique, but a record re-sent after a restart is not
    recognisable as a duplicate. The runtime passes the buffer's epoch.

    Layout compact keeps state: each device's metadata mapping, and which mappings were
    published on the current connection. The forwarder calls `new_session()` when the
    connection changes and `unannounce(device)` when a record of that device was not
    delivered, so the metadata is sent again before the device's next data."""

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
        self.layout = mqtt.layout
        self.epoch = epoch if epoch is not None else uuid.uuid4().hex
        if sparkplug is None and mqtt.layout == "sparkplug":
            sparkplug = SparkplugNode(agent, mqtt)
        self.sparkplug = sparkplug
        #: encode() may return no message for a record only in the Sparkplug layout (its
        #: backlog: drop, or data of a device declared dead); the forwarder treats an
        #: empty result from any other layout as a record that cannot be sent.
        self.may_skip = sparkplug is not None
        #: Encoding changes state that a discarded message would lose (Sparkplug's
        #: births): the forwarder then splits large records before encoding them.
        self.stateful = sparkplug is not None
        self.origin = Origin(agent.id, agent.site, agent.area, agent.line)
        self._fields = self.origin.fields()
        self._head_full: dict[str, Any] = {"agent": agent.id, **self._fields}
        self._head_lean: dict[str, Any] = {"schema": lean.SCHEMA} | {
            k: v for k, v in self._fields.items() if v is not None
        }
        self._head_compact: dict[str, Any] = {"schema": compact.SCHEMA, "agent": agent.id}
        self._head_meta: dict[str, Any] = {"schema": compact.META_SCHEMA} | {
            k: v for k, v in self._fields.items() if v is not None
        }
        self._prefix: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._topics: dict[str, str] = {}
        self.mappings: dict[str, compact.Mapping] = {}
        self._announced: set[tuple[str, str]] = set()
        # A platform that keeps no retained messages (Azure IoT Hub) refuses them: there
        # the metadata is an ordinary message in the stream, before the data it maps.
        self._meta_retain = allows_retain(mqtt.profile)
        self._cached: tuple[Record, list[dict[str, Any]]] | None = None
        self._cached_cols: tuple[Record, RecordColumns] | None = None

    # ------------------------------------------------------------------ topics

    def topic(self, device: str, tag: str | None = None) -> str:
        if tag is None:
            cached = self._topics.get(device)
            if cached is None:
                cached = self._topics[device] = self._mqtt.topic.format(
                    **self._fields, device=device
                )
            return cached
        return self._mqtt.topic_tag.format(**self._fields, device=device, tag=tag)

    def meta_topic(self, device: str, meta: str) -> str:
        """Where layout compact's metadata `meta` of `device` is retained."""
        return self._mqtt.topic_meta.format(**self._fields, device=device, meta=meta)

    # ------------------------------------------------------------------ session state

    def new_session(self) -> None:
        """A new broker connection: metadata goes out again before the next data."""
        self._announced.clear()

    def unannounce(self, device: str) -> None:
        """A record of `device` was not delivered: its metadata may not have been either."""
        self._announced = {k for k in self._announced if k[0] != device}

    # ------------------------------------------------------------------ encoding

    def _samples(self, record: Record) -> list[dict[str, Any]]:
        cached = self._cached
        if cached is not None and cached[0] is record:
            return cached[1]
        samples = samples_of(record)
        if not samples:
            raise PayloadError(f"record {record.id} ({record.device}): no samples")
        self._cached = (record, samples)
        return samples

    def _columns(self, record: Record) -> RecordColumns | None:
        """A format-3 columnar record by columns (the lean layout's fast path), or None
        for the others (JSON bodies, format 2), which go by `_samples`."""
        cached = self._cached_cols
        if cached is not None and cached[0] is record:
            return cached[1]
        data = record.data
        if data[:2] != DICT_MAGIC:
            return None
        try:
            cols = record_columns(data)
        except ValueError as exc:
            raise PayloadError(f"record {record.id} ({record.device}): {exc}") from None
        if not cols.values:
            raise PayloadError(f"record {record.id} ({record.device}): no samples")
        self._cached_cols = (record, cols)
        return cols

    def preamble(self, record: Record, *, limit: int | None = None) -> list[Message]:
        """Messages that must be delivered before `record`'s data can be read: layout
        compact's metadata of the record's device, when it changed or was not published
        on this connection yet (then marked as published). Empty for the other layouts.
        Call it once per record before encode(), so that a record split into parts
        carries the metadata once."""
        if self.layout != "compact":
            return []
        mapping = self.mappings.get(record.device)
        if mapping is None:
            mapping = self.mappings[record.device] = compact.Mapping()
        cols = self._columns(record)
        if cols is not None:
            mapping.update_columns(cols.tags, cols.units, cols.values)
        else:
            mapping.update(self._samples(record))
        key = (record.device, mapping.id)
        if key in self._announced:
            return []
        out = []
        for suffix, payload in compact.meta_payloads(
            self._head_meta, record.device, mapping, _room(self, record.device, limit)
        ):
            out.append(
                Message(
                    topic=self.meta_topic(record.device, suffix),
                    payload=payload,
                    retain=self._meta_retain,
                )
            )
        self._announced.add(key)
        return out

    def encode(
        self,
        record: Record,
        *,
        historical: bool = False,
        gaps: Sequence[Gap] = (),
    ) -> list[Message]:
        """The messages that carry one record. `gaps` go into the first message. Layout
        compact puts its metadata first when `preamble` did not hand it out yet."""
        layout = self.layout
        if self.sparkplug is not None:
            # Sparkplug has no place for gap notices; docs/sparkplug.md says so.
            return self.sparkplug.encode(record, historical=historical)
        epoch = record.epoch or self.epoch
        if layout == "lean":
            cols = self._columns(record)
            payload = None
            if cols is not None:
                payload = lean.encode_columns(
                    self._head_lean, record.device, epoch, cols, historical=historical, gaps=gaps
                )
            if payload is None:
                samples = self._samples(record)
                payload = lean.encode(
                    self._head_lean,
                    record.device,
                    epoch,
                    samples,
                    historical=historical,
                    gaps=gaps,
                )
            return [Message(topic=self.topic(record.device), payload=payload)]
        if layout == "compact":
            return self._compact(record, epoch, historical, gaps)
        samples = self._samples(record)
        if layout == "device":
            return [self._device_message(record, epoch, samples, historical, gaps)]
        return self._tag_messages(record, epoch, samples, historical, gaps)

    def _compact(
        self, record: Record, epoch: str, historical: bool, gaps: Sequence[Gap]
    ) -> list[Message]:
        mapping = self.mappings.get(record.device)
        cols = self._columns(record)
        # A part of a record whose preamble was taken (the forwarder's split) must not
        # change the mapping: its tags are covered, its units and types are carried per
        # sample where they differ.
        pre: list[Message] = []
        if (
            mapping is None
            or not (
                mapping.covers_tags(cols.tags)
                if cols is not None
                else mapping.covers(self._samples(record))
            )
            or (record.device, mapping.id) not in self._announced
        ):
            pre = self.preamble(record)
            mapping = self.mappings[record.device]
        payload = None
        if cols is not None:
            payload = compact.encode_columns(
                self._head_compact,
                record.device,
                epoch,
                mapping,
                cols,
                historical=historical,
                gaps=gaps,
            )
        if payload is None:
            payload = compact.encode(
                self._head_compact,
                record.device,
                epoch,
                mapping,
                self._samples(record),
                historical=historical,
                gaps=gaps,
            )
        return [*pre, Message(topic=self.topic(record.device), payload=payload)]

    def _device_message(
        self,
        record: Record,
        epoch: str,
        samples: list[dict[str, Any]],
        historical: bool,
        gaps: Sequence[Gap],
    ) -> Message:
        # A record keeps the epoch it was stored in (a buffer that got a new epoch
        # still holds records of the old one): its identity must not change on resend.
        key = (record.device, epoch)
        cached = self._prefix.get(key)
        if cached is None:
            prefix = verbose.device_prefix(self._head_full, epoch, record.device)
            cached = self._prefix[key] = (self.topic(record.device), prefix)
        topic, prefix = cached
        payload = verbose.device_payload(prefix, epoch, samples, historical=historical, gaps=gaps)
        return Message(topic=topic, payload=payload)

    def _tag_messages(
        self,
        record: Record,
        epoch: str,
        samples: list[dict[str, Any]],
        historical: bool,
        gaps: Sequence[Gap],
    ) -> list[Message]:
        # A retained historical value would replace a newer retained one.
        retain = self._mqtt.retain_last and not historical
        return [
            Message(
                topic=self.topic(record.device, s["tag"]),
                payload=verbose.tag_payload(
                    self._agent.id,
                    epoch,
                    s,
                    historical=historical,
                    gaps=gaps if i == 0 else (),
                ),
                retain=retain,
            )
            for i, s in enumerate(samples)
        ]


def _room(encoder: PayloadEncoder, device: str, limit: int | None) -> int | None:
    """Payload bytes a metadata message of `device` may have under packet limit `limit`."""
    if limit is None:
        return None
    longest = encoder.meta_topic(device, "f" * 16 + "-99999")
    # packet_size of an empty payload; a full one needs up to 3 more length bytes.
    return limit - packet_size(Message(topic=longest, payload=b"")) - 3
