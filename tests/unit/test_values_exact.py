"""Values and timestamps that JSON cannot carry as they are: one defined representation
each (docs/mqtt.md, "Values JSON cannot carry"), and the epoch in every JSON payload."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from agent.buffer import Record
from agent.config import AgentSection, MqttConfig
from agent.normalize import Columns, Normalizer, SeqCounter
from agent.payload import PayloadEncoder, PayloadError
from agent.schema import BatchPayload, SamplePayload, WireSample
from drivers.base import RawReading, TagCommon
from tests.support.payloads import batches

TS = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def one(value: Any, *, scale: float = 1.0, ts: datetime | None = None, **kw: Any) -> WireSample:
    norm = Normalizer("d", [TagCommon(name="t", scale=scale)])
    [sample] = norm.samples([RawReading("t", value, ts_source=ts, **kw)], TS, SeqCounter(0))
    return sample


@pytest.mark.parametrize(
    ("value", "reason", "text"),
    [
        (math.nan, "not a number", "NaN"),
        (math.inf, "infinite", "Infinity"),
        (-math.inf, "infinite", "-Infinity"),
        ([1.0, math.nan], "not a number", "[1.0, NaN]"),
        ([[1], [math.inf]], "infinite", "[[1], [Infinity]]"),
        ({"a": {"b": -math.inf}}, "infinite", '{"a": {"b": -Infinity}}'),
        (2**64, "out of range", "18446744073709551616"),
        (-(2**63) - 1, "out of range", "-9223372036854775809"),
        ("a\ud800b", "invalid text", '"a\\ud800b"'),
        ({1: 2}, "unsupported value", '{"1": 2}'),
        (b"\x00", "unsupported value", "\"b'\\\\x00'\""),
    ],
)
def test_values_json_cannot_carry(value: Any, reason: str, text: str) -> None:
    for sample in (one(value), _columns(value)):
        assert sample["value"] is None
        assert sample["quality"] == "bad"
        assert sample["reason"] == reason
        assert sample["value_text"] == text
        orjson.dumps(sample)  # encodable as it stands


def _columns(value: Any) -> WireSample:
    norm = Normalizer("d", [TagCommon(name="t")])
    [sample] = norm.samples(Columns(["t"], [value]), TS, SeqCounter(0))
    return sample


@pytest.mark.parametrize(
    "value",
    [
        0,
        -(2**63),
        2**64 - 1,
        0.0,
        -0.0,
        1e308,
        5e-324,
        True,
        "",
        "ü€🙂",
        [],
        [1, [2.5, None]],
        {"k": [1]},
    ],
)
def test_values_json_carries_stay_good_and_exact(value: Any) -> None:
    for sample in (one(value), _columns(value)):
        assert sample["quality"] == "good"
        assert sample["value"] == value
        assert "value_text" not in sample


def test_nesting_deeper_than_the_limit() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    sample = one(deep)
    assert (sample["quality"], sample["reason"]) == ("bad", "too deeply nested")
    assert sample["value_text"].startswith("[[[[")


def test_integer_too_long_for_text() -> None:
    sample = one(10**5000)
    assert sample["reason"] == "out of range"
    assert sample["value_text"] == f"<integer of {(10**5000).bit_length()} bits>"


def test_scaling_that_overflows() -> None:
    assert one(10**400, scale=0.5)["reason"] == "out of range"  # int too large for a float
    sample = one(10.0, scale=1e308)
    assert (sample["reason"], sample["value_text"]) == ("infinite", "Infinity")


def test_a_bad_reading_keeps_its_reason_and_code() -> None:
    sample = one(None, quality="bad", reason="BadSensorFailure", code=0x808C0000)
    assert (sample["reason"], sample["code"], sample["value"]) == (
        "BadSensorFailure",
        0x808C0000,
        None,
    )
    assert "value_text" not in sample
    nan = one(math.nan, quality="uncertain", reason="UncertainLastUsableValue", code=0x40900000)
    assert (nan["quality"], nan["reason"], nan["code"]) == ("bad", "not a number", 0x40900000)


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        (datetime(1601, 1, 1, tzinfo=UTC), "ts_source out of range"),  # OPC UA DateTime 0
        (datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), "ts_source out of range"),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), "ts_source out of range"),
        (datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))), "ts_source out of range"),
        (datetime.min.replace(tzinfo=timezone(timedelta(hours=5))), "ts_source out of range"),
        (datetime(2026, 12, 1, 8, 0), "ts_source without time zone"),
    ],
)
def test_device_timestamps_that_cannot_be_published(ts: datetime, reason: str) -> None:
    sample = one(1.5, ts=ts)
    assert sample["ts_source"] is None
    assert (sample["quality"], sample["reason"], sample["value"]) == ("good", reason, 1.5)
    bad = one(None, ts=ts, quality="bad", reason="BadNoCommunication")
    assert (bad["ts_source"], bad["reason"]) == (None, "BadNoCommunication")


def test_device_timestamps_in_range_are_kept() -> None:
    for ts in (
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 1, 9, 0, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 30, 23, 59, tzinfo=UTC),
    ):
        sample = one(1, ts=ts)
        assert sample["ts_source"] == ts
        assert sample["reason"] is None


def test_ts_source_of_another_type() -> None:
    sample = one(1, ts="2026-12-01T08:00:00Z")  # type: ignore[arg-type]
    assert (sample["ts_source"], sample["reason"]) == (None, "ts_source not a time")


# ---------------------------------------------------------------------- payloads


def _record(samples: list[WireSample]) -> Record:
    data = orjson.dumps(samples, option=orjson.OPT_UTC_Z)
    return Record(7, "d", samples[0]["seq"], samples[-1]["seq"], len(samples), 0.0, data)


def test_every_json_payload_carries_the_epoch_and_value_text() -> None:
    agent = AgentSection(id="gw", site="s")
    samples = [one(math.nan), one(2.5)]
    samples[1]["seq"] = 2
    record = _record(samples)
    [device] = PayloadEncoder(agent, MqttConfig(layout="device"), epoch="e-1").encode(record)
    body = BatchPayload.model_validate_json(device.payload)
    assert body.epoch == "e-1"
    assert body.samples[0].value_text == "NaN"
    assert body.samples[0].value is None
    assert body.samples[1].value_text is None
    assert device.payload.count(b'"value_text"') == 1  # only where set
    for m in PayloadEncoder(agent, MqttConfig(layout="tag"), epoch="e-1").encode(record):
        assert SamplePayload.model_validate_json(m.payload).epoch == "e-1"
    for layout in ("lean", "compact"):
        enc = PayloadEncoder(agent, MqttConfig(layout=layout), epoch="e-1")
        [lean] = batches(enc.preamble(record) + enc.encode(record))
        assert lean.epoch == "e-1"
        assert (lean.samples[0].value, lean.samples[0].value_text) == (None, "NaN")
        assert lean.samples[0].quality == "bad"
        assert (lean.samples[1].value, lean.samples[1].value_text) == (2.5, None)


def test_an_encoder_without_an_epoch_makes_its_own() -> None:
    record = _record([one(1)])
    a = orjson.loads(PayloadEncoder(AgentSection(id="gw"), MqttConfig()).encode(record)[0].payload)
    b = orjson.loads(PayloadEncoder(AgentSection(id="gw"), MqttConfig()).encode(record)[0].payload)
    assert len(a["epoch"]) == 32
    assert a["epoch"] != b["epoch"]


@pytest.mark.parametrize("data", [b"not json", b'{"a": 1}', b'[{"value": 1}]', b"[1]"])
def test_a_record_that_is_not_samples_is_a_payload_error(data: bytes) -> None:
    encoder = PayloadEncoder(AgentSection(id="gw"), MqttConfig(layout="tag"), epoch="e")
    with pytest.raises(PayloadError, match=r"^record 3 \(d\): not"):
        encoder.encode(Record(3, "d", 1, 1, 1, 0.0, data))


def test_an_empty_value_at_the_source_keeps_its_quality() -> None:
    for quality in ("good", "uncertain"):
        sample = one(None, quality=quality)
        assert (sample["value"], sample["quality"], sample["reason"]) == (None, quality, None)
        assert "value_text" not in sample
