"""agent.dataset.decode: the agent's own messages decode to their samples; anything else
is refused with UnknownLayout or MalformedMessage, never another exception."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.buffer import Gap, Record
from agent.buffer.common import encode_batch
from agent.config import AgentSection, MqttConfig
from agent.dataset.decode import DecodeError, MalformedMessage, UnknownLayout, decode
from agent.payload import PayloadEncoder
from agent.schema import WireSample

TS = datetime(2026, 12, 1, 10, 0, 0, 250000, tzinfo=UTC)


def wire(seq: int, tag: str, value: Any, **extra: Any) -> WireSample:
    s: WireSample = {
        "device": "imm-1",
        "tag": tag,
        "value": value,
        "quality": "good",
        "reason": None,
        "code": None,
        "ts_source": None,
        "ts_agent": TS,
        "unit": "bar",
        "seq": seq,
    }
    s.update(extra)  # type: ignore[typeddict-item]
    return s


def record(*samples: WireSample) -> Record:
    enc = encode_batch(samples, 0)
    return Record(1, "imm-1", enc.first_seq, enc.last_seq, enc.count, 0.0, enc.full, "ep1")


@pytest.mark.parametrize("layout", ["device", "tag", "lean", "compact"])
def test_the_agents_messages_decode_to_their_samples(layout: str) -> None:
    mqtt = MqttConfig(layout=layout)  # type: ignore[arg-type]
    encoder = PayloadEncoder(AgentSection(id="gw"), mqtt, epoch="ep0")
    rec = record(wire(1, "pressure", 1450.5), wire(2, "shot", 7, cycle=7))
    messages = encoder.preamble(rec) + encoder.encode(
        rec, historical=True, gaps=[Gap(10, 12, 3, "drop_oldest")]
    )
    samples = [s for m in messages for s in decode(m.topic, m.payload)]
    assert [(s["tag"], s["value"], s["seq"]) for s in samples] == [
        ("pressure", 1450.5, 1),
        ("shot", 7, 2),
    ]
    for s in samples:
        assert (s["agent"], s["epoch"], s["device"]) == ("gw", "ep1", "imm-1")
        assert s["historical"] is True
        assert s["ts_agent"] == "2026-12-01T10:00:00.250000Z"
        assert s["unit"] == "bar"
        assert "schema" not in s
        assert "gaps" not in s
    assert samples[1]["cycle"] == 7  # members the layout passes through are kept


def batch(**over: Any) -> bytes:
    body: dict[str, Any] = {
        "schema": "edge-agent/batch/1",
        "agent": "gw",
        "epoch": "e",
        "device": "d",
        "samples": [{"tag": "t", "value": 1, "quality": "good", "seq": 1, "ts_agent": "x"}],
    }
    body.update(over)
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def with_sample(**over: Any) -> bytes:
    s: dict[str, Any] = {"tag": "t", "value": 1, "quality": "good", "seq": 1, "ts_agent": "x"}
    s.update(over)
    return batch(samples=[{k: v for k, v in s.items() if v != "DROP"}])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (batch(samples="x"), "batch without a samples list"),
        (batch(device=None), "batch without a device name"),
        (batch(agent=None), "no agent id"),
        (batch(epoch=""), "no epoch"),
        (batch(samples=[3]), "samples[0] is not an object"),
        (with_sample(seq="DROP"), "samples[0]: seq missing or not an integer"),
        (with_sample(seq=True), "samples[0]: seq missing or not an integer"),
        (with_sample(seq=0), "samples[0]: seq 0 is below 1"),
        (with_sample(tag=5), "samples[0]: tag missing or not a string"),
        (with_sample(quality="great"), "quality 'great' is not good/uncertain/bad"),
        (with_sample(ts_agent=None), "samples[0]: ts_agent missing or not a string"),
    ],
)
def test_malformed_messages_say_what_is_wrong(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        decode("edge/gw/d", payload)
    assert message in str(err.value)


def test_compact_data_before_its_metadata_says_what_to_subscribe_to() -> None:
    encoder = PayloadEncoder(AgentSection(id="gw2"), MqttConfig(layout="compact"), epoch="e")
    [_meta, data] = encoder.encode(record(wire(1, "pressure", 1450.5)))
    with pytest.raises(MalformedMessage, match=r"subscribe to the metadata topic"):
        decode("edge/gw2/imm-1", data.payload)


@pytest.mark.parametrize(
    ("topic", "payload", "message"),
    [
        ("edge/gw/d", b'{"schema": "edge-agent/batch/9", "samples": []}', "unknown schema"),
        ("edge/gw/d", b'{"samples": []}', "no schema member"),
        ("edge/gw/d", b'{"schema": 3}', "no schema member"),
        ("spBv1.0/g/DDATA/n/d", b"\x08\x01", "Sparkplug B"),
    ],
)
def test_unknown_layouts_are_refused(topic: str, payload: bytes, message: str) -> None:
    with pytest.raises(UnknownLayout) as err:
        decode(topic, payload)
    assert message in str(err.value)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_a_decode_error(payload: bytes) -> None:
    try:
        out = decode("edge/gw/d", payload)
    except DecodeError:
        return
    assert isinstance(out, list)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_decodes_or_raises_a_decode_error(value: Any) -> None:
    for body in (
        value,
        {
            "schema": "edge-agent/batch/1",
            "samples": value,
            "agent": "a",
            "epoch": "e",
            "device": "d",
        },
    ):
        try:
            payload = orjson.dumps(body)
        except (TypeError, orjson.JSONEncodeError):
            return
        try:
            out = decode("edge/gw/d", payload)
        except DecodeError:
            continue
        assert all(isinstance(s["seq"], int) and s["seq"] >= 1 for s in out)
