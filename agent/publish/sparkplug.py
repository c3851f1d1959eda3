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
  birth did not have. Metrics are defined by the first non-null value seen: a metric with
  no value yet is left out of births and data (its bad samples are not sent) until it has
  one. NCMD ``Node Control/Rebirth`` = true re-sends NBIRTH and every DBIRTH.
- **DDEATH** when a device goes down (the poller's state hook). While a device is dead
  its all-bad records are not published (the DDEATH says it); a record of a dead device
  that holds real values (backlog from before it died) goes out as DBIRTH, DDATA, DDEATH.
- **Data.** One DDATA per buffered record, metrics by alias, each with the sample's
  timestamp (ts_source, else ts_agent), ``is_historical`` for backlog, and a ``Quality``
  property (192 good, 64 uncertain, 0 bad: the Ignition convention).

The protobuf wire format is written by hand (varints and length-delimited fields): the
encoder is on the hot path and needs nothing but ``struct``. The tests decode every kind
of message with bindings generated from the published ``sparkplug_b.proto``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from agent.buffer import Record
from agent.config import AgentSection, MqttConfig, SparkplugConfig
from agent.publish import Message, PublishResult

log = structlog.get_logger()

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"

# Sparkplug B datatypes used by the agent (the full table is in sparkplug_b.proto).
INT32 = 3
INT64 = 4
UINT64 = 8
DOUBLE = 10
BOOLEAN = 11
STRING = 12

# Quality codes (Ignition convention, the de-facto standard for Sparkplug quality).
QUALITY_CODES = {"good": 192, "uncertain": 64, "bad": 0}

_U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_DOUBLE = struct.Struct("<d")


# ---------------------------------------------------------------------- wire format


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field_no: int, wire_type: int) -> bytes:
    return _varint((field_no << 3) | wire_type)


def _len_field(field_no: int, data: bytes) -> bytes:
    return _key(field_no, 2) + _varint(len(data)) + data


def _uint_field(field_no: int, n: int) -> bytes:
    return _key(field_no, 0) + _varint(n)


_SEQ_KEY = _key(3, 0)
_TRUE = {f: _uint_field(f, 1) for f in (5, 7, 14)}  # is_historical, is_null, boolean true
_FALSE_BOOL = _uint_field(14, 0)


def _property_set(items: Sequence[tuple[str, int, int | str]]) -> bytes:
    """A PropertySet of (key, type, value) with Int32 or String values."""
    keys = b"".join(_len_field(1, k.encode()) for k, _, _ in items)
    values = b""
    for _, ptype, value in items:
        if isinstance(value, str):
            pv = _uint_field(1, ptype) + _len_field(8, value.encode())
        else:
            pv = _uint_field(1, ptype) + _uint_field(3, value)
        values += _len_field(2, pv)
    return _len_field(9, keys + values)


_QUALITY_PROPS = {q: _property_set([("Quality", INT32, code)]) for q, code in QUALITY_CODES.items()}


def datatype_of(value: object) -> int | None:
    """The Sparkplug datatype a value is published as (None for a null value).

    bool → Boolean, int → Int64 (UInt64 above the Int64 range), float → Double,
    str → String; lists and structures (dicts) → String holding their JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return INT64 if _I64_MIN <= value <= _I64_MAX else UINT64
    if isinstance(value, float):
        return DOUBLE
    return STRING


def _fits(datatype: int, value: object) -> bool:
    """Whether `value` can be published under a metric born as `datatype`."""
    if value is None:
        return True
    actual = datatype_of(value)
    if actual == datatype:
        return True
    if datatype == DOUBLE and actual in (INT64, UINT64):
        return True
    return datatype == UINT64 and actual == INT64 and isinstance(value, int) and value >= 0


def _widen(old: int | None, value: object) -> int | None:
    """The datatype of a metric born as `old` that now has `value`."""
    new = datatype_of(value)
    if old is None or new is None:
        return old if new is None else new
    if {old, new} <= {INT64, UINT64, DOUBLE}:
        return DOUBLE if DOUBLE in (old, new) else UINT64
    return new


def _value_field(datatype: int, value: object) -> bytes:
    if datatype == BOOLEAN:
        return _TRUE[14] if value else _FALSE_BOOL
    if datatype in (INT64, UINT64):
        assert isinstance(value, int)
        return _uint_field(11, value & _U64)
    if datatype == DOUBLE:
        assert isinstance(value, int | float)
        return _key(13, 1) + _DOUBLE.pack(float(value))
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return _len_field(15, text.encode())


def _metric(
    *,
    name: str | None,
    alias: int | None,
    timestamp: int | None,
    datatype: int,
    value: object,
    historical: bool = False,
    props: bytes = b"",
) -> bytes:
    body = b""
    if name is not None:
        body += _len_field(1, name.encode())
    if alias is not None:
        body += _uint_field(2, alias)
    if timestamp is not None:
        body += _uint_field(3, timestamp)
    body += _uint_field(4, datatype)
    if historical:
        body += _TRUE[5]
    if value is None:
        body += _TRUE[7]
    body += props
    if value is not None:
        body += _value_field(datatype, value)
    return _len_field(2, body)


def _payload(timestamp_ms: int, metrics: bytes = b"") -> bytes:
    """Payload without seq: the publisher's `stamp` appends it."""
    return _uint_field(1, timestamp_ms) + metrics


def _now_ms() -> int:
    return int(time.time() * 1000)


_ts_cache: dict[str, int] = {}


def _ms(iso: str | None) -> int | None:
    """Epoch milliseconds of an ISO timestamp as stored in the buffer."""
    if iso is None:
        return None
    cached = _ts_cache.get(iso)
    if cached is None:
        cached = int(datetime.fromisoformat(iso).timestamp() * 1000)
        if len(_ts_cache) > 4096:
            _ts_cache.clear()
        _ts_cache[iso] = cached
    return cached


# ---------------------------------------------------------------------- NCMD decoding


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: ints for varint / fixed fields,
    bytes for length-delimited ones."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            n, pos = _read_varint(buf, pos)
            out.append((field_no, n))
        elif wire == 1:
            out.append((field_no, int.from_bytes(buf[pos : pos + 8], "little")))
            pos += 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            out.append((field_no, buf[pos : pos + n]))
            pos += n
        elif wire == 5:
            out.append((field_no, int.from_bytes(buf[pos : pos + 4], "little")))
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


@dataclass(frozen=True, slots=True)
class CommandMetric:
    """One metric of an NCMD: name or alias, and its boolean/integer value if any."""

    name: str | None
    alias: int | None
    value: int | None


def decode_command(payload: bytes) -> list[CommandMetric]:
    """The metrics of an NCMD payload (only what the agent acts on). Raises ValueError."""
    metrics = []
    for field_no, value in _fields(payload):
        if field_no != 2 or not isinstance(value, bytes):
            continue
        name: str | None = None
        alias: int | None = None
        number: int | None = None
        for f, v in _fields(value):
            if f == 1 and isinstance(v, bytes):
                name = v.decode("utf-8", errors="replace")
            elif f == 2 and isinstance(v, int):
                alias = v
            elif f in (10, 11, 14) and isinstance(v, int):
                number = v
        metrics.append(CommandMetric(name, alias, number))
    return metrics


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
    sample: dict[str, Any] | None = None  # the newest sample published (or to be)


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


class SparkplugNode:
    """The edge node's state and its message encoder. Pure except for the bdSeq file.

    Wiring (agent.runtime): the publisher gets ``will_factory=next_will``,
    ``on_connect_messages=on_connect``, ``prepare=stamp`` and subscribes ``ncmd_topic``
    to ``on_command``; the payload encoder calls ``encode``; the poller's state hook
    calls ``device_state``; ``run`` is a task publishing births, deaths and rebirths.
    """

    def __init__(
        self, agent: AgentSection, mqtt: MqttConfig, *, bdseq_path: str | Path | None = None
    ) -> None:
        config = mqtt.sparkplug or SparkplugConfig(group_id=agent.id)
        self.config = config
        self.group_id = config.group_id
        self.edge_node_id = config.edge_node_id or agent.id
        self._node_prefix = f"{NAMESPACE}/{self.group_id}"
        self.ncmd_topic = self._topic("NCMD")
        self._bdseq = BdSeqStore(bdseq_path)
        self._current_bdseq = self._bdseq.last if self._bdseq.last is not None else 0
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
        metric = _metric(
            name=BDSEQ_METRIC,
            alias=None,
            timestamp=None,
            datatype=INT64,
            value=self._current_bdseq,
        )
        return Message(self._topic("NDEATH"), _payload(_now_ms(), metric), qos=1)

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
        return Message(msg.topic, msg.payload + _SEQ_KEY + _varint(seq), msg.qos, msg.retain)

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
        metrics = _metric(
            name=BDSEQ_METRIC, alias=None, timestamp=now, datatype=INT64, value=self._current_bdseq
        ) + _metric(name=REBIRTH_METRIC, alias=1, timestamp=now, datatype=BOOLEAN, value=False)
        return Message(self._topic("NBIRTH"), _payload(now, metrics), qos=self.config.qos)

    def _dbirth(self, dev: _Device) -> Message:
        self.stats.device_births += 1
        dev.born = True
        parts = []
        for m in dev.metrics.values():
            s = m.sample
            if s is None:
                parts.append(
                    _metric(
                        name=m.name, alias=m.alias, timestamp=None, datatype=m.datatype, value=None
                    )
                )
                continue
            props: list[tuple[str, int, int | str]] = [
                ("Quality", INT32, QUALITY_CODES.get(s["quality"], 0))
            ]
            if s.get("unit"):
                props.append(("engUnit", STRING, str(s["unit"])))
            value = s["value"] if _fits(m.datatype, s["value"]) else None
            parts.append(
                _metric(
                    name=m.name,
                    alias=m.alias,
                    timestamp=_ms(s.get("ts_source") or s.get("ts_agent")),
                    datatype=m.datatype,
                    value=value,
                    props=_property_set(props),
                )
            )
        payload = _payload(_now_ms(), b"".join(parts))
        return Message(self._topic("DBIRTH", dev.name), payload, qos=self.config.qos)

    def _ddeath(self, device: str) -> Message:
        self.stats.device_deaths += 1
        return Message(self._topic("DDEATH", device), _payload(_now_ms()), qos=self.config.qos)

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
            if not dev.born and not dev.dead and dev.metrics:
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
        samples: list[dict[str, Any]] = orjson.loads(record.data)
        if dev.dead and all(s["quality"] == "bad" for s in samples):
            self.stats.records_skipped_dead += 1
            return []
        need_birth = not dev.born
        for s in samples:
            value = s["value"]
            m = dev.metrics.get(s["tag"])
            if m is None:
                datatype = datatype_of(value)
                if datatype is None:
                    continue
                dev.metrics[s["tag"]] = _Metric(s["tag"], self._next_alias, datatype)
                self._next_alias += 1
                need_birth = True
            elif not _fits(m.datatype, value):
                widened = _widen(m.datatype, value)
                assert widened is not None
                m.datatype = widened
                need_birth = True
        out: list[Message] = []
        if need_birth:
            out.append(self._dbirth(dev))
        out.append(self._ddata(dev, samples, historical))
        if dev.dead:
            # Backlog of a device that has since died: deliver it, then say it is dead.
            dev.born = False
            out.append(self._ddeath(dev.name))
        return out

    def _ddata(self, dev: _Device, samples: list[dict[str, Any]], historical: bool) -> Message:
        parts = []
        for s in samples:
            m = dev.metrics.get(s["tag"])
            if m is None:
                continue
            value = s["value"]
            props = _QUALITY_PROPS.get(s["quality"], _QUALITY_PROPS["bad"])
            if s.get("reason"):
                props = _property_set(
                    [
                        ("Quality", INT32, QUALITY_CODES.get(s["quality"], 0)),
                        ("Reason", STRING, str(s["reason"])),
                    ]
                )
            parts.append(
                _metric(
                    name=None,
                    alias=m.alias,
                    timestamp=_ms(s.get("ts_source") or s.get("ts_agent")),
                    datatype=m.datatype,
                    value=value,
                    historical=historical,
                    props=props,
                )
            )
            m.sample = s
        payload = _payload(_now_ms(), b"".join(parts))
        return Message(self._topic("DDATA", dev.name), payload, qos=self.config.qos)


def sparkplug_node(
    agent: AgentSection, mqtt: MqttConfig, buffer_path: str | None
) -> SparkplugNode | None:
    """The edge node of a config with layout sparkplug (None for other layouts); bdSeq
    is kept in ``<buffer.path>.sparkplug-bdseq`` (in memory for a memory buffer)."""
    if mqtt.layout != "sparkplug":
        return None
    path = f"{buffer_path}.sparkplug-bdseq" if buffer_path is not None else None
    return SparkplugNode(agent, mqtt, bdseq_path=path)


__all__ = [
    "BOOLEAN",
    "DOUBLE",
    "INT64",
    "NAMESPACE",
    "QUALITY_CODES",
    "REBIRTH_METRIC",
    "STRING",
    "UINT64",
    "BdSeqStore",
    "CommandMetric",
    "SparkplugNode",
    "SparkplugStats",
    "datatype_of",
    "decode_command",
    "sparkplug_node",
]
