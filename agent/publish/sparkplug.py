"""Sparkplug B edge node: the agent as one edge node, each configured device a device.

Topics (``spBv1.0/{group_id}/...``): NBIRTH, NDEATH, NDATA and NCMD on
``spBv1.0/{group}/{TYPE}/{edge_node}``; DBIRTH, DDATA and DDEATH on
``spBv1.0/{group}/{TYPE}/{edge_node}/{device}``. docs/sparkplug.md is the user's view;
this is how the pieces fit:

- **bdSeq.** Every connection attempt takes the next bdSeq (0–255, wrapping) and sets the
  NDEATH carrying it as the MQTT will (``next_will``, called by the publisher for each
  fresh paho client). The NBIRTH of that connection carries the same bdSeq. The last value
  is kept in a small file next to the buffer, so it keeps counting across restarts.
- **seq.** Stamped at the last moment, when the publisher hands a message to paho
  (``stamp``): seq is then exactly the order on the wire, whoever built the message (the
  forwarder, the birth task, a rebirth). NBIRTH resets it to 0; NDEATH has none. The seq
  field goes at the end of the payload, which protobuf allows.
- **Births.** On connect the publisher sends NBIRTH first (``on_connect``); every device
  is then unborn for the session. ``run`` (a task of the runtime) publishes a DBIRTH for
  each live device with known metrics, and the encoder emits a DBIRTH itself before the
  first DDATA of an unborn device, or when a record brings a metric (or a datatype) its
  birth did not have. A metric's datatype is that of its first non-null value (widened
  when later values need it, with a new DBIRTH). NCMD ``Node Control/Rebirth`` = true
  re-sends NBIRTH and every DBIRTH.
- **DDEATH** when a device goes down (the poller's state hook). While a device is dead
  its all-bad records are not published (the DDEATH says it); a record of a dead device
  that holds real values (backlog from before it died) goes out as DBIRTH, DDATA, DDEATH.
- **Data.** One DDATA per buffered record, metrics by alias and without datatype (the
  birth said it), each with the sample's timestamp (ts_source, else ts_agent),
  ``is_historical`` for backlog, and a ``Quality`` property (192 good, 64 uncertain, 0
  bad: the Ignition convention). NaN and ±Inf go out as the float itself.
- **Births are complete.** A DBIRTH carries every metric the device has: its current
  value, timestamp and quality, read from ``latest`` (the runtime's newest sample per
  device and tag) when the node has it, else the newest sample the node encoded. A tag
  that has had no value yet (bad from the start) is declared too, with ``is_null`` and
  the placeholder datatype String; its first value brings a DBIRTH with the real type.
- **Epoch.** NBIRTH carries the buffer's epoch (``Node Info/Buffer Epoch``, String), read
  from ``epoch`` at every NBIRTH (the buffer can make a new one while the agent runs).

The protobuf encoding is `agent.publish.sparkplug_wire` (pure, no state): this module is
the node's state machine only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.buffer import Record
from agent.buffer.common import record_samples
from agent.config import AgentSection, MqttConfig, SparkplugConfig
from agent.publish import Message, PublishResult
from agent.publish import sparkplug_wire as wire
from agent.publish.sparkplug_wire import (
    BOOLEAN,
    DOUBLE,
    INT64,
    QUALITY_CODES,
    SPECIAL_FLOATS,
    STRING,
    UINT64,
    CommandMetric,
    datatype_of,
    decode_command,
    timestamp_ms,
)

log = structlog.get_logger()

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"

EPOCH_METRIC = "Node Info/Buffer Epoch"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _value(s: Mapping[str, Any]) -> Any:
    """A sample's value for Sparkplug. A value JSON cannot carry is stored as null with
    its text in ``value_text`` (NaN, ±Inf, integers beyond 64 bits, ...): NaN and ±Inf
    go out as the float itself (legal in Sparkplug), anything else as that text."""
    v = s.get("value")
    if v is None:
        text = s.get("value_text")
        if isinstance(text, str):
            return SPECIAL_FLOATS.get(text, text)
    return v


def _ts(s: Mapping[str, Any]) -> int | None:
    """A sample's metric timestamp: ts_source if it is a valid one, else ts_agent."""
    ms = timestamp_ms(s.get("ts_source"))
    return ms if ms is not None else timestamp_ms(s.get("ts_agent"))


# ---------------------------------------------------------------------- bdSeq store


class BdSeqStore:
    """The last bdSeq used, in a small file (None: in memory only, starts at 0)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._last: int | None = None
        self._write_failed = False
        if self.path is not None:
            with contextlib.suppress(OSError, ValueError):
                self._last = int(self.path.read_text(encoding="ascii").strip()) % 256

    @property
    def last(self) -> int | None:
        return self._last

    def next(self) -> int:
        """Take the next bdSeq (0 first, wrapping after 255) and persist it."""
        value = 0 if self._last is None else (self._last + 1) % 256
        self._last = value
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_text(f"{value}\n", encoding="ascii")
                os.replace(tmp, self.path)
            except OSError as exc:
                if not self._write_failed:
                    log.warning(
                        "sparkplug.bdseq.write_failed",
                        path=str(self.path),
                        error=exc.strerror or str(exc),
                        note="bdSeq continues in memory; after a restart it may repeat",
                    )
                self._write_failed = True
            else:
                self._write_failed = False
        return value


# ---------------------------------------------------------------------- edge node


class _Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]: ...


@dataclass(slots=True)
class _Metric:
    name: str
    alias: int
    datatype: int
    typed: bool = True  # False: no value seen yet, `datatype` is the String placeholder
    sample: Mapping[str, Any] | None = None  # the newest sample encoded


@dataclass(slots=True)
class _Device:
    name: str
    metrics: dict[str, _Metric] = field(default_factory=dict)
    born: bool = False  # a DBIRTH went out in the current session
    dead: bool = False  # the poller reports the device down (DDEATH)


@dataclass
class SparkplugStats:
    births: int = 0  # NBIRTH messages built
    device_births: int = 0
    device_deaths: int = 0
    rebirth_requests: int = 0
    records_skipped_dead: int = 0  # all-bad records of a dead device (the DDEATH said it)
    records_dropped_backlog: int = 0  # backlog: drop
    bad_commands: int = 0
    latest_failed: int = 0  # `latest` raised: the birth used the node's own samples


#: device name → tag → its newest sample (a WireSample, or a sample as stored).
LatestSamples = Callable[[str], Mapping[str, Mapping[str, Any]]]


class SparkplugNode:
    """The edge node's state and its message encoder. Pure except for the bdSeq file.

    Wiring (agent.runtime): the publisher gets ``will_factory=next_will``,
    ``on_connect_messages=on_connect``, ``prepare=stamp`` and subscribes ``ncmd_topic``
    to ``on_command``; the payload encoder calls ``encode``; the poller's state hook
    calls ``device_state``; ``run`` is a task publishing births, deaths and rebirths.

    latest: the newest sample of every tag of a device (``Agent.latest[device]``), so
    that births carry current values; epoch: the buffer's epoch, carried by NBIRTH.
    """

    def __init__(
        self,
        agent: AgentSection,
        mqtt: MqttConfig,
        *,
        bdseq_path: str | Path | None = None,
        latest: LatestSamples | None = None,
        epoch: Callable[[], str | None] | None = None,
    ) -> None:
        config = mqtt.sparkplug or SparkplugConfig(group_id=agent.id)
        self.config = config
        self.group_id = config.group_id
        self.edge_node_id = config.edge_node_id or agent.id
        self._node_prefix = f"{NAMESPACE}/{self.group_id}"
        self.ncmd_topic = self._topic("NCMD")
        self._bdseq = BdSeqStore(bdseq_path)
        self._current_bdseq = self._bdseq.last if self._bdseq.last is not None else 0
        self._latest = latest
        self._epoch = epoch
        self._seq = 0
        self._devices: dict[str, _Device] = {}
        self._next_alias = 2  # 1 is Node Control/Rebirth
        self._nbirth_pending = False
        self._deaths: list[str] = []
        self._wake = asyncio.Event()
        self.stats = SparkplugStats()

    # ------------------------------------------------------------------ topics

    def _topic(self, kind: str, device: str | None = None) -> str:
        if device is None:
            return f"{self._node_prefix}/{kind}/{self.edge_node_id}"
        return f"{self._node_prefix}/{kind}/{self.edge_node_id}/{device}"

    # ------------------------------------------------------------------ publisher hooks

    @property
    def bdseq(self) -> int:
        """The bdSeq of the current (or last) connection."""
        return self._current_bdseq

    def next_will(self) -> Message:
        """For each new connection attempt: the next bdSeq, and its NDEATH as the will
        (QoS 1, not retained, as the specification requires)."""
        self._current_bdseq = self._bdseq.next()
        return self._death_message()

    def _death_message(self) -> Message:
        m = wire.metric(
            name=BDSEQ_METRIC,
            alias=None,
            timestamp=None,
            datatype=INT64,
            value=self._current_bdseq,
        )
        return Message(self._topic("NDEATH"), wire.payload(_now_ms(), m), qos=1)

    def clean_death(self) -> Message:
        """The NDEATH the agent publishes itself before a clean disconnect (a clean
        MQTT DISCONNECT discards the will)."""
        return self._death_message()

    def on_connect(self) -> list[Message]:
        """Called first after every connect: a new session starts with NBIRTH; every
        device is unborn until its DBIRTH (published by `run` or by `encode`)."""
        for dev in self._devices.values():
            dev.born = False
        self._deaths.clear()
        self._nbirth_pending = False
        self._wake.set()
        return [self._nbirth()]

    def stamp(self, msg: Message) -> Message:
        """Append the seq to a Sparkplug message as it is handed to paho (NBIRTH: 0)."""
        parts = msg.topic.split("/", 3)
        if len(parts) < 3 or parts[0] != NAMESPACE or parts[2] in ("NDEATH", "NCMD", "DCMD"):
            return msg
        if parts[2] == "NBIRTH":
            self._seq = 0
        seq = self._seq
        self._seq = (seq + 1) % 256
        return Message(msg.topic, msg.payload + wire.seq_field(seq), msg.qos, msg.retain)

    def on_command(self, topic: str, payload: bytes) -> None:
        """An NCMD arrived: `Node Control/Rebirth` = true re-sends every birth."""
        try:
            metrics = decode_command(payload)
        except ValueError as exc:
            self.stats.bad_commands += 1
            log.warning("sparkplug.ncmd.invalid", topic=topic, error=str(exc))
            return
        for m in metrics:
            if (m.name == REBIRTH_METRIC or (m.name is None and m.alias == 1)) and m.value:
                self.request_rebirth()
                return
        log.info(
            "sparkplug.ncmd.ignored",
            topic=topic,
            metrics=[m.name if m.name is not None else m.alias for m in metrics],
        )

    @property
    def dcmd_filter(self) -> str:
        """The topic filter of every device's DCMD (writes; agent.command)."""
        return f"{self._node_prefix}/DCMD/{self.edge_node_id}/+"

    def metric_name(self, device: str, alias: int) -> str | None:
        """The tag a metric alias of `device` stands for (as its DBIRTH declared)."""
        dev = self._devices.get(device)
        if dev is None:
            return None
        return next((m.name for m in dev.metrics.values() if m.alias == alias), None)

    def request_rebirth(self) -> None:
        self.stats.rebirth_requests += 1
        log.info("sparkplug.rebirth", devices=len(self._devices))
        self._nbirth_pending = True
        self._wake.set()

    def device_state(self, device: str, state: str) -> None:
        """The poller's transition: 'down' sends DDEATH; 'up' a DBIRTH."""
        dev = self._device(device)
        if state == "down":
            if dev.dead:
                return
            dev.dead = True
            if dev.born:
                dev.born = False
                self._deaths.append(device)
        elif state == "up":
            dev.dead = False
        self._wake.set()

    # ------------------------------------------------------------------ births

    def _device(self, name: str) -> _Device:
        dev = self._devices.get(name)
        if dev is None:
            dev = self._devices[name] = _Device(name)
        return dev

    def _nbirth(self) -> Message:
        self.stats.births += 1
        now = _now_ms()
        metrics = wire.metric(
            name=BDSEQ_METRIC, alias=None, timestamp=now, datatype=INT64, value=self._current_bdseq
        ) + wire.metric(name=REBIRTH_METRIC, alias=1, timestamp=now, datatype=BOOLEAN, value=False)
        epoch = self._read_epoch()
        if epoch is not None:
            metrics += wire.metric(
                name=EPOCH_METRIC, alias=None, timestamp=now, datatype=STRING, value=epoch
            )
        return Message(self._topic("NBIRTH"), wire.payload(now, metrics), qos=self.config.qos)

    def _read_epoch(self) -> str | None:
        if self._epoch is None:
            return None
        try:
            epoch = self._epoch()
        except Exception as exc:  # a birth must go out whatever the buffer says
            log.warning("sparkplug.epoch.unavailable", error=repr(exc))
            return None
        return epoch if isinstance(epoch, str) else None

    def _latest_of(self, device: str) -> Mapping[str, Mapping[str, Any]]:
        if self._latest is None:
            return {}
        try:
            found = self._latest(device)
            if not isinstance(found, Mapping):
                raise TypeError(f"latest() returned {type(found).__name__}, not a mapping")
            return {
                str(tag): s for tag, s in found.items() if isinstance(s, Mapping) and "quality" in s
            }
        except Exception as exc:  # births fall back to the node's own samples
            self.stats.latest_failed += 1
            log.warning("sparkplug.latest.failed", device=device, error=repr(exc))
            return {}

    def _declare(self, dev: _Device, tag: str, value: object) -> _Metric:
        datatype = wire.datatype_of(value)
        m = _Metric(tag, self._next_alias, datatype or STRING, typed=datatype is not None)
        self._next_alias += 1
        dev.metrics[tag] = m
        return m

    def _dbirth(self, dev: _Device) -> Message:
        """Every metric of the device with its current value (from `latest` first), its
        timestamp and quality; a metric without a value is declared with is_null."""
        self.stats.device_births += 1
        dev.born = True
        latest = self._latest_of(dev.name)
        for tag, newest in latest.items():
            if tag not in dev.metrics:
                self._declare(dev, tag, _value(newest))
        parts = []
        for m in dev.metrics.values():
            s: Mapping[str, Any] | None = latest.get(m.name) or m.sample
            if s is None:
                parts.append(
                    wire.metric(
                        name=m.name, alias=m.alias, timestamp=None, datatype=m.datatype, value=None
                    )
                )
                continue
            value = _value(s)
            if value is not None and not m.typed:
                m.datatype = wire.datatype_of(value) or STRING
                m.typed = True
            elif not wire.fits(m.datatype, value):
                m.datatype = wire.widen(m.datatype, value) or m.datatype
            unit = s.get("unit")
            parts.append(
                wire.metric(
                    name=m.name,
                    alias=m.alias,
                    timestamp=_ts(s),
                    datatype=m.datatype,
                    value=value,
                    props=wire.quality_props(
                        str(s.get("quality")), s.get("reason"), unit if unit else None
                    ),
                )
            )
        data = wire.payload(_now_ms(), b"".join(parts))
        return Message(self._topic("DBIRTH", dev.name), data, qos=self.config.qos)

    def _ddeath(self, device: str) -> Message:
        self.stats.device_deaths += 1
        return Message(self._topic("DDEATH", device), wire.payload(_now_ms()), qos=self.config.qos)

    def pending(self) -> list[Message]:
        """What `run` publishes now: NBIRTH (rebirth), DDEATHs, then the DBIRTHs of live
        devices with known metrics that were not born in this session."""
        out: list[Message] = []
        if self._nbirth_pending:
            self._nbirth_pending = False
            for dev in self._devices.values():
                dev.born = False
            self._deaths.clear()
            out.append(self._nbirth())
        for name in self._deaths:
            out.append(self._ddeath(name))
        self._deaths.clear()
        for dev in self._devices.values():
            if not dev.born and not dev.dead and (dev.metrics or self._latest_of(dev.name)):
                out.append(self._dbirth(dev))
        return out

    async def run(self, publisher: _Publisher) -> None:
        """Publish births, deaths and rebirths as they become due, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await publisher.wait_connected()
            messages = self.pending()
            if not messages:
                continue
            results = await publisher.publish(messages)
            for msg, result in zip(messages, results, strict=True):
                if not result.ok:
                    # A lost connection starts a new session with NBIRTH anyway.
                    log.debug("sparkplug.birth.failed", topic=msg.topic, reason=result.reason)

    # ------------------------------------------------------------------ data

    def encode(self, record: Record, *, historical: bool = False) -> list[Message]:
        """The messages carrying one buffered record: usually one DDATA; a DBIRTH first
        when the device is unborn or the record brings a new metric or datatype."""
        if historical and self.config.backlog == "drop":
            self.stats.records_dropped_backlog += 1
            return []
        dev = self._device(record.device)
        samples: list[dict[str, Any]] = record_samples(record.data)
        if dev.dead and all(s.get("quality") == "bad" for s in samples):
            self.stats.records_skipped_dead += 1
            return []
        need_birth = not dev.born
        values = [_value(s) for s in samples]
        for s, value in zip(samples, values, strict=True):
            tag = str(s.get("tag"))
            m = dev.metrics.get(tag)
            if m is None:
                m = self._declare(dev, tag, value)
                need_birth = True
            elif value is not None and not m.typed:
                m.datatype = wire.datatype_of(value) or STRING
                m.typed = True
                need_birth = True
            elif not wire.fits(m.datatype, value):
                m.datatype = wire.widen(m.datatype, value) or m.datatype
                need_birth = True
            m.sample = s
        out: list[Message] = []
        if need_birth:
            out.append(self._dbirth(dev))
        out.append(self._ddata(dev, samples, values, historical))
        if dev.dead:
            # Backlog of a device that has since died: deliver it, then say it is dead.
            dev.born = False
            out.append(self._ddeath(dev.name))
        return out

    def _ddata(
        self,
        dev: _Device,
        samples: list[dict[str, Any]],
        values: list[Any],
        historical: bool,
    ) -> Message:
        parts = []
        for s, value in zip(samples, values, strict=True):
            m = dev.metrics[str(s.get("tag"))]
            parts.append(
                wire.metric(
                    name=None,
                    alias=m.alias,
                    timestamp=_ts(s),
                    datatype=m.datatype,
                    declare=False,
                    # A value a birth of this session could not declare (the datatype
                    # changed since) is never sent under the wrong type.
                    value=value if wire.fits(m.datatype, value) else None,
                    historical=historical,
                    props=wire.quality_props(str(s.get("quality")), s.get("reason")),
                )
            )
        data = wire.payload(_now_ms(), b"".join(parts))
        return Message(self._topic("DDATA", dev.name), data, qos=self.config.qos)


def sparkplug_node(
    agent: AgentSection,
    mqtt: MqttConfig,
    buffer_path: str | None,
    *,
    latest: LatestSamples | None = None,
    epoch: Callable[[], str | None] | None = None,
) -> SparkplugNode | None:
    """The edge node of a config with layout sparkplug (None for other layouts); bdSeq
    is kept in ``<buffer.path>.sparkplug-bdseq`` (in memory for a memory buffer)."""
    if mqtt.layout != "sparkplug":
        return None
    path = f"{buffer_path}.sparkplug-bdseq" if buffer_path is not None else None
    return SparkplugNode(agent, mqtt, bdseq_path=path, latest=latest, epoch=epoch)


__all__ = [
    "BOOLEAN",
    "DOUBLE",
    "EPOCH_METRIC",
    "INT64",
    "NAMESPACE",
    "QUALITY_CODES",
    "REBIRTH_METRIC",
    "STRING",
    "UINT64",
    "BdSeqStore",
    "CommandMetric",
    "LatestSamples",
    "SparkplugNode",
    "SparkplugStats",
    "datatype_of",
    "decode_command",
    "sparkplug_node",
]
