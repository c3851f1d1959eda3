"""Derived samples in every layout: the JSON layouts carry their optional members and
validate against the shipped schemas; Sparkplug declares the derived tags as metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from agent.buffer import Record
from agent.buffer.common import encode_batch
from agent.config import AgentSection, MqttConfig
from agent.payload import PayloadEncoder
from agent.schema import BatchPayload, SamplePayload, WireSample

SCHEMAS = Path(__file__).parents[2] / "agent" / "schemas"
TS = datetime(2026, 12, 1, 11, 0, 0, tzinfo=UTC)


def derived() -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "device": "imm",
        "quality": "good",
        "reason": None,
        "code": None,
        "ts_source": None,
        "ts_agent": TS,
        "unit": None,
    }
    return [
        {**base, "tag": "shot", "value": 7, "seq": 1, "cycle": 7,
         "missed": {"first": 5, "last": 6, "count": 2}},
        {**base, "tag": "shot.p", "value": 1.5, "seq": 2, "cycle": 7, "unit": "bar"},
        {**base, "tag": "vib.mean", "value": 0.1, "seq": 3, "window_start": TS},
        {**base, "tag": "temp", "value": 20.0, "seq": 4, "repeat": True},
    ]  # fmt: skip


def record() -> Record:
    samples: list[WireSample] = derived()  # type: ignore[assignment]
    batch = encode_batch(samples, 0)
    return Record(1, "imm", batch.first_seq, batch.last_seq, batch.count, 0.0, batch.full)


def encoder(**mqtt: Any) -> PayloadEncoder:
    return PayloadEncoder(AgentSection(id="gw", site="s1"), MqttConfig.model_validate(mqtt))


def test_lean_and_compact_carry_the_members_in_extra_and_decode_them_exactly() -> None:
    from agent.buffer.common import record_samples
    from tests.support.payloads import samples

    rec = record()
    for layout in ("lean", "compact"):
        enc = encoder(layout=layout)
        messages = enc.preamble(rec) + enc.encode(rec)
        schema = "lean" if layout == "lean" else "compact"
        body = orjson.loads(messages[-1].payload)
        jsonschema.validate(body, json.loads((SCHEMAS / f"{schema}.schema.json").read_text()))
        assert samples(messages) == record_samples(rec.data)
        assert {"i" if layout == "lean" else "n": 3, "repeat": True} in body["extra"]


def test_the_device_layout_carries_the_members_and_validates() -> None:
    (message,) = encoder(layout="device").encode(record())
    body = orjson.loads(message.payload)
    BatchPayload.model_validate_json(message.payload)
    jsonschema.validate(body, json.loads((SCHEMAS / "batch.schema.json").read_text()))
    head, col, window, repeat = body["samples"]
    assert head["missed"] == {"first": 5, "last": 6, "count": 2}
    assert col["cycle"] == 7
    assert window["window_start"] == "2026-12-01T11:00:00Z"
    assert repeat["repeat"] is True
    assert "repeat" not in head


def test_the_tag_layout_carries_them_per_message() -> None:
    messages = encoder(layout="tag").encode(record())
    schema = json.loads((SCHEMAS / "sample.schema.json").read_text())
    assert [m.topic for m in messages] == [
        "edge/gw/imm/shot",
        "edge/gw/imm/shot.p",
        "edge/gw/imm/vib.mean",
        "edge/gw/imm/temp",
    ]
    for m in messages:
        SamplePayload.model_validate_json(m.payload)
        jsonschema.validate(orjson.loads(m.payload), schema)
    assert orjson.loads(messages[3].payload)["repeat"] is True


def test_sparkplug_declares_derived_tags_as_metrics() -> None:
    messages = encoder(layout="sparkplug", sparkplug={"group_id": "g"}).encode(record())
    assert [m.topic for m in messages] == ["spBv1.0/g/DBIRTH/gw/imm", "spBv1.0/g/DDATA/gw/imm"]
    for name in (b"shot", b"shot.p", b"vib.mean", b"temp"):
        assert name in messages[0].payload
