"""Property-based tests: any name, value and timestamp, through normalise → buffer (memory
and SQLite) → every payload layout (lean, compact, device, tag, Sparkplug B).

What must hold for every input hypothesis finds:
- normalising never raises, and seqs are consecutive from the counter's last + 1;
- a value JSON cannot carry (NaN, ±Inf, integers beyond 64 bits, invalid text, ...) is
  bad quality with value null and the value kept as text in `value_text`;
- a device timestamp that cannot be published (naive, before 1970, year 9999) is null;
- the buffer stores the batch and gives back exactly those seqs;
- every JSON payload parses, validates against the shipped JSON Schema of its layout,
  carries the epoch, and decodes (reference decoder) to exactly the stored samples;
  every topic is one paho accepts; Sparkplug payloads decode with bindings made from
  the published .proto (not with the agent's code);
- a name the loader accepts gives topics MQTT can carry; one it refuses is refused with
  file:line, never with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import jsonschema
import orjson
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer import Record
from agent.buffer.common import record_samples
from agent.buffer.memory import MemoryBuffer
from agent.buffer.sqlite import SqliteBuffer
from agent.config import AgentSection, BufferConfig, ConfigError, MqttConfig, parse_config
from agent.layouts import JSON_LAYOUTS
from agent.layouts.decode import Decoder
from agent.normalize import (
    INFINITE,
    INT_MAX,
    INT_MIN,
    NOT_A_NUMBER,
    Normalizer,
    SeqCounter,
    value_problem,
)
from agent.payload import PayloadEncoder
from agent.publish.sparkplug import SparkplugNode
from agent.schema import WireSample
from drivers.base import QualityName, RawReading, TagCommon
from drivers.modbus.config import ModbusDevice
from tests.support.sparkplug import generate_bindings

SCHEMAS = Path(__file__).resolve().parents[2] / "agent" / "schemas"
VALIDATORS = {
    schema: jsonschema.Draft202012Validator(json.loads((SCHEMAS / file).read_text()))
    for schema, file in (
        ("edge-agent/batch/2", "lean.schema.json"),
        ("edge-agent/compact/1", "compact.schema.json"),
        ("edge-agent/meta/1", "meta.schema.json"),
        ("edge-agent/batch/1", "batch.schema.json"),
        ("edge-agent/sample/1", "sample.schema.json"),
    )
}
AGENT = AgentSection(id="gw", site="plant", area="a1", line="l4")
TS_AGENT = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
EPOCH = "3f2a9c0d4b5e6f708192a3b4c5d6e7f8"

PROPERTY = settings(
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return generate_bindings(tmp_path_factory.mktemp("sparkplug_pb"))


# ---------------------------------------------------------------------- strategies

# Any code point, lone surrogates included (a str can hold them; UTF-8 cannot).
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: beyond int64 and uint64 too
    st.integers(min_value=INT_MIN - 2, max_value=INT_MAX + 2),
    st.floats(),  # NaN, ±Inf, subnormals, -0.0
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**30), 2**63, 2**64]),
    any_text,
    st.just(""),
)
values = st.one_of(
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=3),
        max_leaves=12,
    ),
    st.lists(st.floats(width=32), max_size=3000),  # long arrays
    st.lists(st.integers(min_value=0, max_value=65535), min_size=1000, max_size=1000),
)
zones = st.one_of(
    st.just(UTC),
    st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
    ),
)
timestamps = st.one_of(
    st.none(),
    st.datetimes(timezones=zones),  # 0001 .. 9999, aware
    st.datetimes(),  # naive
    st.sampled_from(
        [
            datetime(1601, 1, 1, tzinfo=UTC),  # OPC UA DateTime 0
            datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),  # OPC UA's largest
            datetime.max.replace(tzinfo=UTC),
            datetime.min.replace(tzinfo=UTC),
            datetime(1970, 1, 1, tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        ]
    ),
)
qualities: st.SearchStrategy[QualityName] = st.sampled_from(["good", "uncertain", "bad"])
tag_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
scales = st.one_of(
    st.just((1.0, 0.0)),
    st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.floats(-1e6, 1e6)),
    st.just((1e308, 0.0)),  # finite in the config, overflows to inf when applied
)


@st.composite
def polls(draw: st.DrawFn) -> tuple[list[TagCommon], list[RawReading]]:
    names = draw(st.lists(tag_names, min_size=1, max_size=6, unique=True))
    tags = []
    readings = []
    for name in names:
        scale, offset = draw(scales)
        tags.append(TagCommon(name=name, scale=scale, offset=offset))
        readings.append(
            RawReading(
                tag=name,
                value=draw(values),
                quality=draw(qualities),
                reason=draw(st.none() | st.just("BadSensorFailure")),
                code=draw(st.none() | st.integers(0, 2**32 - 1)),
                ts_source=draw(timestamps),
            )
        )
    return tags, readings


# ---------------------------------------------------------------------- helpers


def non_finite(value: object) -> bool:
    """Whether a NaN or an infinity is anywhere in `value` (written independently of
    agent.normalize)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    return False


def scaled(value: object, tag: TagCommon) -> object:
    if (tag.scale == 1.0 and tag.offset == 0.0) or isinstance(value, bool):
        return value
    try:
        if isinstance(value, int | float):
            return value * tag.scale + tag.offset
        if isinstance(value, list):
            return [
                v * tag.scale + tag.offset
                if isinstance(v, int | float) and not isinstance(v, bool)
                else v
                for v in value
            ]
    except OverflowError:
        return value
    return value


def publishable_topic(topic: str) -> None:
    """paho's own topic checks (publish() validates before it looks at the connection)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.publish(topic, b"x", qos=0)  # raises ValueError for a topic it refuses
    assert "+" not in topic
    assert "#" not in topic
    assert "\x00" not in topic
    assert not topic.startswith("$")
    assert len(topic.encode("utf-8")) <= 65_535


def record_of(samples: Sequence[WireSample], stored: Record) -> None:
    assert stored.first_seq == samples[0]["seq"]
    assert stored.last_seq == samples[-1]["seq"]
    assert stored.count == len(samples)
    assert [s["seq"] for s in record_samples(stored.data)] == [s["seq"] for s in samples]


async def through_buffer(kind: str, samples: list[WireSample]) -> Record:
    with tempfile.TemporaryDirectory() as tmp:
        config = BufferConfig(kind=kind, path=str(Path(tmp) / "b.db"))  # type: ignore[arg-type]
        buffer = MemoryBuffer(config) if kind == "memory" else SqliteBuffer(config)
        await buffer.open()
        try:
            await buffer.append("press", samples)
            [stored] = await buffer.take(10)
        finally:
            await buffer.close()
    return stored


def check_layouts(record: Record, samples: list[WireSample], pb: ModuleType) -> None:
    # A stored record carries the epoch it was stored in; the encoder's is the fallback.
    expected_epoch = record.epoch or EPOCH
    assert len(record.epoch) == 32
    stored = orjson.dumps(record_samples(record.data), option=orjson.OPT_SORT_KEYS)
    for layout in JSON_LAYOUTS:
        encoder = PayloadEncoder(AGENT, MqttConfig(layout=layout), epoch=EPOCH)
        messages = encoder.preamble(record) + encoder.encode(record, historical=True)
        decoder = Decoder()
        out: list[dict[str, Any]] = []
        for m in messages:
            body = orjson.loads(m.payload)
            VALIDATORS[body["schema"]].validate(body)
            if layout != "tag":  # tag names reach topics only there (checked at load)
                publishable_topic(m.topic)
            d = decoder.decode(m.payload)
            if d.kind == "data":
                assert d.epoch == expected_epoch
                assert d.historical
                out += d.samples
        # The reference decoder gives back exactly what the buffer holds.
        assert orjson.dumps(out, option=orjson.OPT_SORT_KEYS) == stored, layout
        assert [s["seq"] for s in out] == [s["seq"] for s in samples]

    node = SparkplugNode(
        AGENT, MqttConfig.model_validate({"layout": "sparkplug", "sparkplug": {"group_id": "g"}})
    )
    for m in node.encode(record):
        decoded = pb.Payload()
        decoded.ParseFromString(m.payload)
        publishable_topic(m.topic)


# ---------------------------------------------------------------------- properties


# Each example opens a SQLite buffer (file, WAL, schema): fewer examples, same strategies.
@settings(PROPERTY, max_examples=30)
@given(poll=polls(), last=st.integers(0, 2**40))
def test_normalise_buffer_and_encode_any_poll(
    pb: ModuleType, poll: tuple[list[TagCommon], list[RawReading]], last: int
) -> None:
    tags, readings = poll
    samples = Normalizer("press", tags).samples(readings, TS_AGENT, SeqCounter(last))

    assert [s["seq"] for s in samples] == list(range(last + 1, last + 1 + len(readings)))
    by_name = {t.name: t for t in tags}
    for s, r in zip(samples, readings, strict=True):
        assert value_problem(s["value"]) is None  # every layout can carry it
        if r.value is not None and non_finite(scaled(r.value, by_name[r.tag])):
            assert s["quality"] == "bad"
            assert s["value"] is None
            assert s["value_text"]
        if s["quality"] == "bad" and "value_text" in s:
            assert s["value"] is None
        if s["reason"] in (NOT_A_NUMBER, INFINITE):
            assert any(w in s["value_text"] for w in ("NaN", "Infinity")), s["value_text"]
        ts = s["ts_source"]
        if ts is not None:
            assert ts.utcoffset() is not None
            assert datetime(1970, 1, 1, tzinfo=UTC) <= ts < datetime(9999, 12, 31, tzinfo=UTC)
        if r.ts_source is not None and ts is None and s["quality"] == "good" and not r.reason:
            assert s["reason"] is not None
            assert s["reason"].startswith("ts_source "), s["reason"]

    for kind in ("memory", "sqlite"):
        stored = asyncio.run(through_buffer(kind, samples))
        record_of(samples, stored)
        check_layouts(stored, samples, pb)


@PROPERTY
@given(values=st.lists(st.floats(width=32) | st.floats(), min_size=1, max_size=50))
def test_every_nan_and_infinity_is_bad_quality_on_the_hot_path(values: list[float]) -> None:
    from agent.normalize import Columns

    tags = [TagCommon(name=f"t{i}") for i in range(len(values))]
    columns = Columns([t.name for t in tags], values)
    samples = Normalizer("press", tags).samples(columns, TS_AGENT, SeqCounter(0))
    for s, v in zip(samples, values, strict=True):
        if math.isnan(v):
            assert (s["quality"], s["reason"], s["value"], s["value_text"]) == (
                "bad",
                "not a number",
                None,
                "NaN",
            )
        elif math.isinf(v):
            text = "Infinity" if v > 0 else "-Infinity"
            assert (s["quality"], s["reason"], s["value"], s["value_text"]) == (
                "bad",
                "infinite",
                None,
                text,
            )
        else:
            assert s["quality"] == "good"
            assert s["value"] == v
            assert "value_text" not in s


def _yaml_string(text: str) -> str:
    # JSON's escapes (\uXXXX, surrogates included) are YAML double-quoted escapes too.
    return json.dumps(text)


@PROPERTY
@given(
    tag=any_text,
    site=any_text,
    group=any_text,
    layout=st.sampled_from(["device", "tag", "sparkplug"]),
)
def test_names_either_refused_with_a_line_or_publishable(
    tag: str, site: str, group: str, layout: str
) -> None:
    text = (
        f"agent: {{id: gw, site: {_yaml_string(site)}}}\n"
        "mqtt:\n"
        f"  layout: {layout}\n"
        "  topic: 'edge/{site}/{agent}/{device}'\n"
        f"  sparkplug: {{group_id: {_yaml_string(group)}}}\n"
        "devices:\n"
        "  - {name: plc, protocol: modbus, host: 127.0.0.1, port: 502,\n"
        f"     tags: [{{name: {_yaml_string(tag)}, address: 0}}]}}\n"
    )
    try:
        config = parse_config(text, "c.yaml", simulate=False)
    except ConfigError as exc:
        refused = exc.problems
    else:
        refused = []
    if refused:
        for problem in refused:
            assert problem.startswith("c.yaml:"), problem
            assert int(problem[len("c.yaml:") :].split(" ", 1)[0]) >= 1
        return
    samples: list[WireSample] = [
        {
            "device": "plc",
            "tag": cast(ModbusDevice, config.devices[0]).tags[0].name,
            "value": 1,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": TS_AGENT,
            "unit": None,
            "seq": 1,
        }
    ]
    record = Record(1, "plc", 1, 1, 1, 0.0, orjson.dumps(samples, option=orjson.OPT_UTC_Z))
    encoder = PayloadEncoder(config.agent, config.mqtt, epoch=EPOCH)
    for message in encoder.encode(record):
        publishable_topic(message.topic)
    if layout == "tag":  # edge/{agent}/{device}/{tag}: the tag name is one level
        assert encoder.encode(record)[0].topic.count("/") == 3


def test_values_of_every_kind_survive_the_sqlite_round_trip_exactly() -> None:
    values: list[Any] = [
        0,
        -1,
        INT_MIN,
        INT_MAX,
        0.1,
        -0.0,
        1e308,
        "",
        "ü",
        [1, [2, [3]]],
        {"a": [1.5]},
    ]
    tags = [TagCommon(name=f"t{i}") for i in range(len(values))]
    readings = [RawReading(t.name, v) for t, v in zip(tags, values, strict=True)]
    samples = Normalizer("press", tags).samples(readings, TS_AGENT, SeqCounter(0))
    stored = asyncio.run(through_buffer("sqlite", samples))
    assert [s["value"] for s in record_samples(stored.data)] == values
    assert all(s["quality"] == "good" for s in samples)
