"""Sparkplug B wire format: protobuf encoding of payloads, metrics and properties. Pure.

Written by hand (varints and length-delimited fields) because the encoder is on the hot
path and needs nothing but ``struct``; the tests decode every kind of message with
bindings generated from the published ``sparkplug_b.proto``. The edge node's state
machine (births, deaths, bdSeq, aliases) is `agent.publish.sparkplug`; this module knows
nothing of it.

Every function here accepts any value the agent's samples can hold and never raises on
one: a value that has no Sparkplug representation of its own travels as String, and a
timestamp outside what a Sparkplug ``uint64`` of epoch milliseconds can say (before 1970,
unparseable) is left out (see `timestamp_ms`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

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

#: The JSON text of a non-finite float (how the JSON layouts keep it) → the float.
SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def varint(n: int) -> bytes:
    """A protobuf varint of 0 ≤ n < 2**64."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field_no: int, wire_type: int) -> bytes:
    return varint((field_no << 3) | wire_type)


def _len_field(field_no: int, data: bytes) -> bytes:
    return _key(field_no, 2) + varint(len(data)) + data


def _uint_field(field_no: int, n: int) -> bytes:
    return _key(field_no, 0) + varint(n)


def _text(s: str) -> bytes:
    # A lone surrogate cannot be UTF-8; protobuf strings must be.
    return s.encode("utf-8", errors="replace")


SEQ_KEY = _key(3, 0)
_TRUE = {f: _uint_field(f, 1) for f in (5, 7, 14)}  # is_historical, is_null, boolean true
_FALSE_BOOL = _uint_field(14, 0)


def seq_field(seq: int) -> bytes:
    """The payload's seq field (appended last, which protobuf allows)."""
    return SEQ_KEY + varint(seq)


def property_set(items: Sequence[tuple[str, int, int | str]]) -> bytes:
    """A metric's PropertySet of (key, type, value) with Int32 or String values."""
    keys = b"".join(_len_field(1, _text(k)) for k, _, _ in items)
    values = b""
    for _, ptype, value in items:
        if isinstance(value, str):
            pv = _uint_field(1, ptype) + _len_field(8, _text(value))
        else:
            pv = _uint_field(1, ptype) + _uint_field(3, value & 0xFFFFFFFF)
        values += _len_field(2, pv)
    return _len_field(9, keys + values)


QUALITY_PROPS = {q: property_set([("Quality", INT32, code)]) for q, code in QUALITY_CODES.items()}


def quality_props(quality: str, reason: str | None, unit: str | None = None) -> bytes:
    """`Quality` (Int32), `Reason` when there is one and `engUnit` when given (births)."""
    if not reason and not unit:
        return QUALITY_PROPS.get(quality, QUALITY_PROPS["bad"])
    items: list[tuple[str, int, int | str]] = [("Quality", INT32, QUALITY_CODES.get(quality, 0))]
    if reason:
        items.append(("Reason", STRING, str(reason)))
    if unit:
        items.append(("engUnit", STRING, str(unit)))
    return property_set(items)


def datatype_of(value: object) -> int | None:
    """The Sparkplug datatype a value is published as (None for a null value).

    bool → Boolean, int → Int64 (UInt64 above the Int64 range, String beyond UInt64 or
    below Int64), float → Double (NaN and ±Inf included: legal in Sparkplug), str →
    String; lists and structures (dicts) → String holding their JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        if _I64_MIN <= value <= _I64_MAX:
            return INT64
        return UINT64 if 0 <= value <= _U64 else STRING
    if isinstance(value, float):
        return DOUBLE
    return STRING


def fits(datatype: int, value: object) -> bool:
    """Whether `value` can be published under a metric born as `datatype`."""
    if value is None:
        return True
    actual = datatype_of(value)
    if actual == datatype:
        return True
    if datatype == DOUBLE and actual in (INT64, UINT64):
        return True
    return datatype == UINT64 and actual == INT64 and isinstance(value, int) and value >= 0


def widen(old: int | None, value: object) -> int | None:
    """The datatype of a metric born as `old` that now has `value`."""
    new = datatype_of(value)
    if old is None or new is None:
        return old if new is None else new
    if {old, new} <= {INT64, UINT64, DOUBLE}:
        return DOUBLE if DOUBLE in (old, new) else UINT64
    return new


def _json_text(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        # orjson refuses integers beyond 64 bits and non-string keys; the standard
        # library writes both (and anything else as its str()).
        return json.dumps(value, default=str)


def _value_field(datatype: int, value: object) -> bytes:
    if datatype == BOOLEAN:
        return _TRUE[14] if value else _FALSE_BOOL
    if datatype in (INT64, UINT64) and isinstance(value, int):
        return _uint_field(11, value & _U64)
    if datatype == DOUBLE and isinstance(value, int | float):
        return _key(13, 1) + _DOUBLE.pack(float(value))
    if isinstance(value, str):
        return _len_field(15, _text(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return _len_field(15, str(value).encode())
    return _len_field(15, _text(_json_text(value)))


def metric(
    *,
    name: str | None,
    alias: int | None,
    timestamp: int | None,
    datatype: int,
    value: object,
    historical: bool = False,
    props: bytes = b"",
    declare: bool = True,
) -> bytes:
    """One Metric (payload field 2): `value` encoded as `datatype`, None as is_null.
    declare=False leaves the datatype field out (DDATA: the birth said it)."""
    body = b""
    if name is not None:
        body += _len_field(1, _text(name))
    if alias is not None:
        body += _uint_field(2, alias)
    if timestamp is not None:
        body += _uint_field(3, timestamp)
    if declare:
        body += _uint_field(4, datatype)
    if historical:
        body += _TRUE[5]
    if value is None:
        body += _TRUE[7]
    body += props
    if value is not None:
        body += _value_field(datatype, value)
    return _len_field(2, body)


def payload(timestamp_ms: int, metrics: bytes = b"") -> bytes:
    """A Payload without seq: the node's `stamp` appends it."""
    return _uint_field(1, timestamp_ms) + metrics


_ts_cache: dict[str, int | None] = {}


def timestamp_ms(ts: str | datetime | None) -> int | None:
    """Epoch milliseconds of a timestamp (ISO text as stored in the buffer, or a
    datetime), or None when there is none or it cannot be a Sparkplug timestamp: before
    1970 (the OPC UA DateTime 0 decodes as 1601-01-01), unparseable, or beyond uint64.
    A naive timestamp is taken as UTC (the agent's and OPC UA's convention)."""
    if ts is None:
        return None
    if isinstance(ts, datetime):
        return _dt_ms(ts)
    if not isinstance(ts, str):
        return None
    if ts in _ts_cache:
        return _ts_cache[ts]
    try:
        ms = _dt_ms(datetime.fromisoformat(ts))
    except ValueError:
        ms = None
    if len(_ts_cache) > 4096:
        _ts_cache.clear()
    _ts_cache[ts] = ms
    return ms


def _dt_ms(dt: datetime) -> int | None:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        ms = int(dt.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):
        return None
    return ms if 0 <= ms <= _U64 else None


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


def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: ints for varint / fixed fields,
    bytes for length-delimited ones. Raises ValueError."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            n, pos = _read_varint(buf, pos)
            out.append((field_no, n))
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated field")
            out.append((field_no, int.from_bytes(buf[pos : pos + size], "little")))
            pos += size
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            out.append((field_no, buf[pos : pos + n]))
            pos += n
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64: two's complement in the field
_FLOAT = struct.Struct("<f")


@dataclass(frozen=True, slots=True)
class CommandMetric:
    """One metric of an NCMD or DCMD: name or alias; `value` its boolean/integer field
    as sent (what node control acts on); `data` its value typed by the metric's datatype
    (Int8..Int64 sign-extended, Float and Double as floats, Boolean, String/Text), None
    when it carries none; `datatype` the Sparkplug datatype when given."""

    name: str | None
    alias: int | None
    value: int | None
    data: bool | int | float | str | None = None
    datatype: int | None = None


def _typed(
    field_no: int, raw: int | bytes, datatype: int | None
) -> bool | int | float | str | None:
    if field_no in (10, 11) and isinstance(raw, int):
        bits = _SIGNED_BITS.get(datatype or 0)
        if bits is not None:
            raw &= (1 << bits) - 1
            if raw >= 1 << (bits - 1):
                raw -= 1 << bits
        return raw
    if field_no == 12 and isinstance(raw, int):
        return float(_FLOAT.unpack(raw.to_bytes(4, "little"))[0])
    if field_no == 13 and isinstance(raw, int):
        return float(_DOUBLE.unpack(raw.to_bytes(8, "little"))[0])
    if field_no == 14 and isinstance(raw, int):
        return bool(raw)
    if field_no == 15 and isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return None


def decode_command(data: bytes) -> list[CommandMetric]:
    """The metrics of an NCMD or DCMD payload. Raises ValueError."""
    metrics = []
    for field_no, value in fields(data):
        if field_no != 2 or not isinstance(value, bytes):
            continue
        name: str | None = None
        alias: int | None = None
        number: int | None = None
        datatype: int | None = None
        raw_value: tuple[int, int | bytes] | None = None
        for f, v in fields(value):
            if f == 1 and isinstance(v, bytes):
                name = v.decode("utf-8", errors="replace")
            elif f == 2 and isinstance(v, int):
                alias = v
            elif f == 4 and isinstance(v, int):
                datatype = v
            elif f in (10, 11, 12, 13, 14, 15):
                raw_value = (f, v)
                if f in (10, 11, 14) and isinstance(v, int):
                    number = v
        typed = _typed(*raw_value, datatype) if raw_value is not None else None
        metrics.append(CommandMetric(name, alias, number, typed, datatype))
    return metrics


__all__ = [
    "BOOLEAN",
    "DOUBLE",
    "INT32",
    "INT64",
    "QUALITY_CODES",
    "SPECIAL_FLOATS",
    "STRING",
    "UINT64",
    "CommandMetric",
    "datatype_of",
    "decode_command",
    "fields",
    "fits",
    "metric",
    "payload",
    "property_set",
    "quality_props",
    "seq_field",
    "timestamp_ms",
    "varint",
    "widen",
]
