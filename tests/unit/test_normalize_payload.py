"""Normalisation and payload encoding: pure code, checked against the pydantic schema."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from agent.buffer import Record
from agent.config import AgentSection, MqttConfig
from agent.normalize import Normalizer, SeqCounter, bad_readings, scale_value
from agent.payload import PayloadEncoder
from agent.schema import BATCH_SCHEMA, SAMPLE_SCHEMA, BatchPayload, SamplePayload
from drivers.base import RawReading, TagCommon

TS = datetime(2026, 11, 29, 10, 0, 0, 123000, tzinfo=UTC)


def tags() -> list[TagCommon]:
    return [
        TagCommon(name="temp", unit="degC", scale=0.1),
        TagCommon(name="count"),
        TagCommon(name="flags", scale=2.0, offset=1.0),
    ]


@pytest.mark.parametrize(
    ("value", "scale", "offset", "expected"),
    [
        (215, 0.1, 0.0, 21.5),
        (-40, 0.5, 10.0, -10.0),
        (True, 10.0, 1.0, True),
        ("abc", 2.0, 0.0, "abc"),
        ([1, 2, True], 2.0, 1.0, [3.0, 5.0, True]),
    ],
)
def test_scale_value(value: object, scale: float, offset: float, expected: object) -> None:
    assert scale_value(value, scale, offset) == pytest.approx(expected)  # type: ignore[arg-type]


def test_samples_carry_consecutive_seq_and_scaled_values() -> None:
    norm = Normalizer("oven", tags())
    seq = SeqCounter(41)
    readings = [
        RawReading("temp", 215),
        RawReading("count", 7),
        RawReading("flags", None, "bad", "modbus exception 2 (illegal data address)", 2),
    ]
    out = norm.samples(readings, TS, seq)
    assert [s["seq"] for s in out] == [42, 43, 44]
    assert seq.last == 44
    assert out[0]["value"] == pytest.approx(21.5)
    assert out[0]["unit"] == "degC"
    assert out[1]["value"] == 7
    assert isinstance(out[1]["value"], int)  # identity scale keeps the raw type
    assert out[2]["value"] is None
    assert out[2]["quality"] == "bad"
    assert out[2]["code"] == 2
    for s in out:
        SamplePayload.model_validate({"schema": SAMPLE_SCHEMA, "agent": "gw", "epoch": "e1", **s})


def test_bad_readings() -> None:
    out = bad_readings(["a", "b"], "timeout")
    assert [(r.tag, r.value, r.quality, r.reason) for r in out] == [
        ("a", None, "bad", "timeout"),
        ("b", None, "bad", "timeout"),
    ]


def _record(samples: list[dict[str, object]]) -> Record:
    data = orjson.dumps(samples, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)
    return Record(7, "oven", 1, len(samples), len(samples), 0.0, data)


def test_device_layout_payload_validates_against_schema() -> None:
    agent = AgentSection(id="gw-1", site="s1", area="a1", line="l1")
    mqtt = MqttConfig(layout="device", topic="{site}/{area}/{line}/{device}")
    samples = Normalizer("oven", tags()).samples(
        [RawReading("temp", 215), RawReading("count", 3)], TS, SeqCounter(0)
    )
    (msg,) = PayloadEncoder(agent, mqtt).encode(_record(list(samples)))  # type: ignore[arg-type]
    assert msg.topic == "s1/a1/l1/oven"
    assert msg.qos == 1
    body = orjson.loads(msg.payload)
    payload = BatchPayload.model_validate(body)
    assert body["schema"] == BATCH_SCHEMA
    assert payload.device == "oven"
    assert [s.seq for s in payload.samples] == [1, 2]
    assert body["samples"][0]["ts_agent"] == "2026-11-29T10:00:00.123000Z"


def test_tag_layout_one_message_per_sample() -> None:
    agent = AgentSection(id="gw-1")
    mqtt = MqttConfig(layout="tag")
    samples = Normalizer("oven", tags()).samples(
        [RawReading("temp", 215), RawReading("count", 3)], TS, SeqCounter(10)
    )
    msgs = PayloadEncoder(agent, mqtt).encode(_record(list(samples)))  # type: ignore[arg-type]
    assert [m.topic for m in msgs] == ["edge/gw-1/oven/temp", "edge/gw-1/oven/count"]
    bodies = [SamplePayload.model_validate(orjson.loads(m.payload)) for m in msgs]
    assert [b.seq for b in bodies] == [11, 12]
    assert bodies[0].value == pytest.approx(21.5)


def test_a_record_keeps_its_own_epoch_and_a_foreign_gap_names_its_epoch() -> None:
    from agent.buffer import Gap

    samples = [{"device": "d", "tag": "t", "value": 1, "quality": "good", "seq": 7}]
    old = Record(1, "d", 7, 7, 1, 0.0, orjson.dumps(samples), epoch="a" * 32)
    new = Record(2, "d", 8, 8, 1, 0.0, orjson.dumps([{**samples[0], "seq": 8}]))
    enc = PayloadEncoder(AgentSection(id="gw"), MqttConfig(), epoch="b" * 32)
    gaps = [Gap(3, 4, 2, "corrupt", "a" * 32), Gap(5, 6, 2, "skipped", "b" * 32)]
    [m_old] = enc.encode(old, gaps=gaps)
    [m_new] = enc.encode(new)
    body_old, body_new = orjson.loads(m_old.payload), orjson.loads(m_new.payload)
    assert body_old["epoch"] == "a" * 32  # stored in the old epoch: same identity on resend
    assert body_new["epoch"] == "b" * 32  # no epoch stored: the buffer's current one
    assert body_old["gaps"] == [
        {"first_seq": 3, "last_seq": 4, "count": 2, "reason": "corrupt"},
        {"first_seq": 5, "last_seq": 6, "count": 2, "reason": "skipped", "epoch": "b" * 32},
    ]
    [tag_msg] = PayloadEncoder(AgentSection(id="gw"), MqttConfig(layout="tag")).encode(old)
    assert orjson.loads(tag_msg.payload)["epoch"] == "a" * 32
