"""Every JSON layout against its reference decoder, for arbitrary records.

What must hold for any record hypothesis finds (any tags, repeated ones included, any
values, qualities, reasons, codes, timestamps, units, seqs with holes, NaN kept as
value_text):

- encode → `agent.layouts.decode` gives back exactly the samples `record_samples` reads
  from the record (compared as canonical JSON, so 1 vs 1.0 vs True and -0.0 vs 0.0
  count as different), with its agent, epoch, historical flag and gaps;
- every message validates against the layout's shipped JSON Schema;
- split by the forwarder to a packet limit, no message is above the limit, the parts
  cover the record's seqs exactly once and in order, and the gap notices ride on exactly
  one message.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer import Gap, Record
from agent.buffer.common import record_samples
from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.layouts import compact
from agent.layouts.decode import DecodeError, Decoder, MetaMissing, decode
from agent.payload import PayloadEncoder
from agent.publish import Message, packet_size
from agent.publish.fake import FakePublisher
from agent.publish.limits import DEFAULT_MAX_MESSAGE_BYTES, effective_max_message_bytes

SCHEMAS = Path(__file__).resolve().parents[2] / "agent" / "schemas"
VALIDATORS = {
    name: jsonschema.Draft202012Validator(json.loads((SCHEMAS / file).read_text()))
    for name, file in (
        ("edge-agent/batch/2", "lean.schema.json"),
        ("edge-agent/compact/1", "compact.schema.json"),
        ("edge-agent/meta/1", "meta.schema.json"),
        ("edge-agent/batch/1", "batch.schema.json"),
        ("edge-agent/sample/1", "sample.schema.json"),
    )
}
AGENT = AgentSection(id="gw", site="plant", area="a1", line="l4")
EPOCH = "3f2a9c0d4b5e6f708192a3b4c5d6e7f8"
JSON_LAYOUTS = ("lean", "compact", "device", "tag")
TS = "2026-12-01T08:00:00.123456Z"
_F32 = struct.Struct("<f")

CASES = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def canonical(samples: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(samples, option=orjson.OPT_SORT_KEYS)


def f32(x: float) -> float:
    return float(_F32.unpack(_F32.pack(x))[0])


# ---------------------------------------------------------------------- strategies

texts = st.text(st.characters(codec="utf-8"), max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
# Any float32 bit pattern, widened as a float32 register's value is: most need many
# digits as a float64 (0.1f is 0.10000000149011612).
float32s = (
    st.integers(0, 2**32 - 1)
    .map(lambda bits: float(struct.unpack("<f", struct.pack("<I", bits))[0]))
    .filter(math.isfinite)
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    finite,
    float32s,
    float32s,  # twice: float32 registers are the common case
    st.integers(0, 65535),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=2),
    max_leaves=6,
)
timestamps = st.one_of(
    st.just(TS),
    st.datetimes(timezones=st.just(__import__("datetime").UTC)).map(
        lambda d: orjson.dumps(d, option=orjson.OPT_UTC_Z).decode().strip('"')
    ),
)
tags = st.one_of(st.sampled_from(["a", "b", "press/kW", "t0001", "ü"]), texts.filter(bool))


@st.composite
def sample_dicts(draw: st.DrawFn, device: str) -> dict[str, Any]:
    quality = draw(st.sampled_from(["good", "good", "good", "uncertain", "bad"]))
    s: dict[str, Any] = {
        "device": device if draw(st.integers(0, 20)) else "other",
        "tag": draw(tags),
        "value": draw(json_values),
        "quality": quality,
        "reason": None if quality == "good" and draw(st.booleans()) else draw(texts | st.none()),
        "code": draw(st.none() | st.integers(0, 2**32 - 1)),
        "ts_source": draw(st.none() | timestamps),
        "ts_agent": draw(st.sampled_from([TS, TS, TS]) | timestamps),
        "unit": draw(st.none() | st.sampled_from(["kW", "bar", "degC"])),
        "seq": 0,
    }
    if draw(st.integers(0, 6)) == 0:
        text = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "123456789012345678901"]))
        s.update(value=None, quality="bad", reason="not a number", value_text=text)
    return s


@st.composite
def records(draw: st.DrawFn, max_size: int = 40) -> Record:
    samples = draw(st.lists(sample_dicts("plc"), min_size=1, max_size=max_size))
    seq = draw(st.integers(1, 2**40))
    for s in samples:
        s["seq"] = seq
        seq += draw(st.sampled_from([1, 1, 1, 1, 2, 7]))
    data = orjson.dumps(samples)
    epoch = draw(st.sampled_from(["", EPOCH, "0" * 32]))
    return Record(
        7, "plc", samples[0]["seq"], samples[-1]["seq"], len(samples), 0.0, data, epoch=epoch
    )


gap_lists = st.lists(
    st.builds(
        Gap,
        st.integers(1, 100),
        st.integers(100, 200),
        st.integers(1, 100),
        st.sampled_from(["drop_oldest", "dead_letter"]),
        st.sampled_from(["", EPOCH, "1" * 32]),
    ),
    max_size=2,
)


def encoder(layout: str) -> PayloadEncoder:
    return PayloadEncoder(AGENT, MqttConfig(layout=layout), epoch=EPOCH)  # type: ignore[arg-type]


def decode_all(messages: list[Message], decoder: Decoder | None = None) -> list[Any]:
    decoder = decoder or Decoder()
    out = []
    for m in messages:
        body = orjson.loads(m.payload)
        VALIDATORS[body["schema"]].validate(body)
        d = decoder.decode(m.payload)
        if d.kind == "data":
            out.append(d)
    return out


# ---------------------------------------------------------------------- properties


@CASES
@given(record=records(), historical=st.booleans(), gaps=gap_lists)
@pytest.mark.parametrize("layout", JSON_LAYOUTS)
def test_every_layout_decodes_back_to_exactly_the_records_samples(
    layout: str, record: Record, historical: bool, gaps: list[Gap]
) -> None:
    enc = encoder(layout)
    messages = enc.preamble(record) + enc.encode(record, historical=historical, gaps=gaps)
    decoded = decode_all(messages)
    expected = record_samples(record.data)
    assert canonical([s for d in decoded for s in d.samples]) == canonical(expected)
    epoch = record.epoch or EPOCH
    for d in decoded:
        assert (d.agent, d.epoch, d.device or "plc") == ("gw", epoch, d.device or "plc")
        assert d.historical is historical
    carried = [d.gaps for d in decoded if d.gaps]
    if gaps:
        assert carried == [
            [
                {
                    "first_seq": g.first_seq,
                    "last_seq": g.last_seq,
                    "count": g.count,
                    "reason": g.reason,
                    **({"epoch": g.epoch} if g.epoch and g.epoch != epoch else {}),
                }
                for g in gaps
            ]
        ]
        assert decoded[0].gaps  # on the first message
    else:
        assert carried == []


@CASES
@given(
    record=records(max_size=120),
    limit=st.integers(1024, 6000),
    gaps=gap_lists,
    historical=st.booleans(),
)
@pytest.mark.parametrize("layout", JSON_LAYOUTS)
def test_split_to_a_packet_limit_every_message_fits_and_the_seqs_are_exact(
    layout: str, record: Record, limit: int, gaps: list[Gap], historical: bool
) -> None:
    enc = encoder(layout)
    fwd = Forwarder(MemoryBuffer(BufferConfig(kind="memory")), FakePublisher(), enc)
    pre = fwd._preamble(record, limit)
    parts = fwd._encode_fitting(record, historical, gaps, limit)
    assert all(p.poison is None for p in parts)  # every single sample here fits 1 KiB
    messages = pre + [m for p in parts for m in p.messages]
    assert all(packet_size(m) <= limit for m in messages)
    decoded = decode_all(messages)
    assert canonical([s for d in decoded for s in d.samples]) == canonical(
        record_samples(record.data)
    )
    # Each part is a sub-record with exact seqs, in order, covering the record once.
    seqs = [s["seq"] for s in record_samples(record.data)]
    at = 0
    for p in parts:
        assert p.record.first_seq == seqs[at]
        assert p.record.last_seq == seqs[at + p.record.count - 1]
        at += p.record.count
    assert at == len(seqs)
    assert all(d.historical is historical for d in decoded)
    assert sum(1 for d in decoded if d.gaps) == (1 if gaps else 0)


# ---------------------------------------------------------------------- examples


def _poll(n: int, *, ts: str = TS, tags: list[str] | None = None, first: int = 1) -> Record:
    names = tags or [f"t{i:04d}" for i in range(n)]
    samples = [
        {
            "device": "plc",
            "tag": name,
            "value": f32(0.1 * i) if i % 3 == 1 else i,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": ts,
            "unit": "kW" if i % 2 else None,
            "seq": first + i,
        }
        for i, name in enumerate(names)
    ]
    return Record(1, "plc", first, first + len(names) - 1, len(names), 0.0, orjson.dumps(samples))


def test_lean_is_small_and_says_everything_once() -> None:
    record = _poll(1000)
    [m] = encoder("lean").encode(record)
    body = orjson.loads(m.payload)
    assert body["ts"] == TS
    assert body["seq"] == [1, 1000]
    assert "seqs" not in body
    assert "extra" not in body  # all good, one ts, units from the units map
    assert body["units"]["t0001"] == "kW"
    assert "t0000" not in body["units"]
    assert len(m.payload) / 1000 < 32


@pytest.mark.parametrize("layout", ["lean", "compact"])
def test_polls_merged_into_one_message_say_each_timestamp_once(layout: str) -> None:
    """Records of several polls in one message (merged under a publish-rate limit): one
    ts_agent per poll in `ts_changes`, nothing per sample."""
    later = "2026-12-01T08:00:00.223456Z"
    one, two = _poll(100), _poll(100, ts=later, first=101)
    samples = record_samples(one.data) + record_samples(two.data)
    merged = Record(1, "plc", 1, 200, 200, 0.0, orjson.dumps(samples))
    enc = encoder(layout)
    [*pre, m] = enc.preamble(merged) + enc.encode(merged)
    body = orjson.loads(m.payload)
    assert body["ts"] == TS
    assert body["ts_changes"] == [[100, later]]
    assert "extra" not in body  # the unit of each tag too: said once
    decoder = Decoder()
    for p in pre:
        decoder.decode(p.payload)
    assert canonical(decoder.decode(m.payload).samples) == canonical(samples)


def test_compact_float32_values_are_short_and_come_back_exactly() -> None:
    v = f32(73.123456)
    assert repr(v) == "73.12345886230469"
    assert compact.float32_short(v) == 73.12346
    assert f32(compact.float32_short(v)) == v
    assert compact.value_type(v) == "float32"
    assert compact.value_type(20.5) is None  # as short either way: decides nothing
    assert compact.value_type(0.1) == "float64"  # not a float32 value at all
    assert compact.value_type(1) == "int"
    assert compact.value_type(True) == "bool"
    assert compact.value_type(None) is None
    # A float32 tag whose first value is round gets its type with the first one that is not.
    mapping = compact.Mapping()
    mapping.update([{"tag": "x", "value": 50.0, "unit": None}])
    first = mapping.id
    assert mapping.entries == [["x", None, None]]
    assert not mapping.update([{"tag": "x", "value": 0.0, "unit": None}])
    assert mapping.update([{"tag": "x", "value": v, "unit": None}])
    assert mapping.entries == [["x", "float32", None]]
    assert mapping.id != first
    assert not mapping.update([{"tag": "x", "value": 0.1, "unit": None}])  # decided once


def test_compact_metadata_goes_out_once_per_connection_and_on_change() -> None:
    enc = encoder("compact")
    first = _poll(4)
    [meta] = enc.preamble(first)
    assert meta.retain
    assert meta.topic.startswith("edge-meta/gw/plc/")
    body = orjson.loads(meta.payload)
    assert [e["tag"] for e in body["tags"]] == ["t0000", "t0001", "t0002", "t0003"]
    assert body["tags"][1] == {"tag": "t0001", "type": "float32", "unit": "kW"}
    assert enc.preamble(_poll(4, first=5)) == []  # same mapping, same connection
    enc.new_session()
    assert [m.topic for m in enc.preamble(_poll(4, first=9))] == [meta.topic]
    enc.unannounce("plc")  # a record of the device was not delivered
    assert len(enc.preamble(_poll(4, first=13))) == 1
    # A poll group with other tags: the mapping grows, the old indexes stay.
    other = _poll(2, tags=["t0003", "new"], first=17)
    [meta2] = enc.preamble(other)
    body2 = orjson.loads(meta2.payload)
    assert body2["meta"] != body["meta"]
    assert [e["tag"] for e in body2["tags"]] == ["t0000", "t0001", "t0002", "t0003", "new"]
    [data] = enc.encode(other)
    data_body = orjson.loads(data.payload)
    assert data_body["i"] == 3
    assert data_body["meta"] == body2["meta"]
    # A consumer that only has the old mapping cannot decode it and is told so.
    decoder = Decoder()
    decoder.decode(meta.payload)
    with pytest.raises(MetaMissing):
        decoder.decode(data.payload)
    decoder.decode(meta2.payload)
    assert [s["tag"] for s in decoder.decode(data.payload).samples] == ["t0003", "new"]


def test_compact_metadata_larger_than_the_limit_is_sent_in_parts() -> None:
    enc = encoder("compact")
    record = _poll(2000)
    pre = enc.preamble(record, limit=16384)
    assert len(pre) > 1
    assert all(packet_size(m) <= 16384 for m in pre)
    assert len({m.topic for m in pre}) == len(pre)  # each part retained on its own topic
    decoder = Decoder()
    for m in reversed(pre):  # parts may arrive in any order
        decoder.decode(m.payload)
    [data] = enc.encode(record)
    assert len(decoder.decode(data.payload).samples) == 2000


def test_a_metadata_entry_larger_than_the_limit_is_a_payload_error() -> None:
    enc = encoder("compact")
    record = _poll(2, tags=["x" * 3000, "y"])
    fwd = Forwarder(MemoryBuffer(BufferConfig(kind="memory")), FakePublisher(), enc)
    with pytest.raises(Exception, match="does not fit the packet limit"):
        fwd._preamble(record, 1024)
    assert enc.preamble(record) != []  # not marked as published: sent with the next try


def test_a_2000_tag_record_splits_into_as_few_parts_as_its_size_asks_for() -> None:
    record = _poll(2000)
    for layout in ("lean", "compact", "device"):
        enc = encoder(layout)
        fwd = Forwarder(MemoryBuffer(BufferConfig(kind="memory")), FakePublisher(), enc)
        whole = fwd._encode_fitting(record, False, (), None)[0].messages[-1]
        for limit in (16384, 131072):
            fwd._preamble(record, limit)
            parts = fwd._encode_fitting(record, False, (), limit)
            sizes = [packet_size(m) for p in parts for m in p.messages]
            assert max(sizes) <= limit
            # No more parts than the bytes need with the forwarder's 5 % margin, plus one.
            need = math.ceil(packet_size(whole) / (limit * 0.95))
            assert len(parts) <= need + 1, (layout, limit)


@pytest.mark.parametrize(
    ("configured", "broker", "platform", "expected"),
    [
        (None, None, None, DEFAULT_MAX_MESSAGE_BYTES),
        (None, 16384, None, 16384),
        (None, 1 << 28, None, 1 << 28),  # the broker said so
        (65536, None, None, 65536),
        (65536, 16384, None, 16384),  # the broker's limit applies on top
        (8192, 16384, None, 8192),
        (None, None, 128_000, 128_000),  # a profile's platform limit
        (None, 100_000, 128_000, 100_000),
        (200_000, None, 128_000, 200_000),  # the config wins over the profile
    ],
)
def test_effective_max_message_bytes(
    configured: int | None, broker: int | None, platform: int | None, expected: int
) -> None:
    assert effective_max_message_bytes(configured, broker, platform_bytes=platform) == expected


def test_default_layout_is_lean_and_compact_needs_device_and_meta_in_its_topic() -> None:
    assert MqttConfig().layout == "lean"
    with pytest.raises(ValueError, match=r"topic_meta must contain \{meta\}"):
        MqttConfig.model_validate({"layout": "compact", "topic_meta": "m/{agent}/{device}"})
    with pytest.raises(ValueError, match=r"\{device\} and \{meta\}"):
        MqttConfig.model_validate({"layout": "compact", "topic_meta": "m/{agent}"})


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "no 'schema' member"),
        (b'{"schema": "other/1"}', "unknown schema"),
        (b'{"schema": "edge-agent/batch/2", "agent": "gw"}', "member 'device'"),
        (
            b'{"schema": "edge-agent/batch/2", "agent": "gw", "device": "d", "ts": "x",'
            b' "seq": [1, 1], "tags": ["a"], "values": [1, 2]}',
            "2 values for 1 tags",
        ),
        (
            b'{"schema": "edge-agent/batch/2", "agent": "gw", "device": "d", "ts": "x",'
            b' "seq": [1, 3], "tags": ["a"], "values": [1]}',
            "3 seqs for 1 samples",
        ),
        (
            b'{"schema": "edge-agent/batch/2", "agent": "gw", "device": "d", "ts": "x",'
            b' "seq": [1, 1], "tags": ["a"], "values": [1], "extra": [{"i": 4}]}',
            "outside the message",
        ),
    ],
)
def test_the_decoder_refuses_what_is_not_a_message_precisely(payload: bytes, error: str) -> None:
    with pytest.raises(DecodeError, match=error):
        decode(payload)


# ---------------------------------------------------------------------- boundaries


async def _forwarder(encoder: PayloadEncoder) -> tuple[MemoryBuffer, FakePublisher, Forwarder]:
    buf = MemoryBuffer(BufferConfig(kind="memory"))
    await buf.open()
    pub = FakePublisher()
    await pub.start()
    return buf, pub, Forwarder(buf, pub, encoder)


async def _append(buf: MemoryBuffer, device: str, first: int, tags: list[str]) -> None:
    from tests.support.samples import wire_sample

    await buf.append(device, [wire_sample(device, first + i, tag=t) for i, t in enumerate(tags)])


async def test_a_preamble_that_raises_sets_that_record_aside_and_others_flow() -> None:
    class Broken(PayloadEncoder):
        def preamble(self, record: Record, *, limit: int | None = None) -> list[Message]:
            if record.device == "bad":
                raise RuntimeError("metadata bug")
            return super().preamble(record, limit=limit)

    buf, pub, fwd = await _forwarder(
        Broken(AGENT, MqttConfig(layout="compact", topic="edge/gw/{device}"), epoch=EPOCH)
    )
    await _append(buf, "bad", 1, ["a", "b"])
    await _append(buf, "ok", 3, ["a", "b"])
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert (letter.device, letter.reason) == ("bad", "cannot encode: RuntimeError: metadata bug")
    got = samples_of_published(pub)
    assert [s["seq"] for s in got] == [3, 4]
    assert buf.stats().records == 0


async def test_metadata_goes_out_again_after_a_reconnect_and_before_the_data() -> None:
    buf, pub, fwd = await _forwarder(
        PayloadEncoder(AGENT, MqttConfig(layout="compact", topic="edge/gw/{device}"), epoch=EPOCH)
    )
    await _append(buf, "plc", 1, ["a", "b"])
    await fwd.forward_once()
    await _append(buf, "plc", 3, ["a", "b"])
    await fwd.forward_once()
    topics = [m.topic.split("/")[0] for m in pub.published]
    assert topics == ["edge-meta", "edge", "edge"]  # once per connection
    pub.set_connected(False)
    pub.set_connected(True)  # a new session: connected_since changes
    await _append(buf, "plc", 5, ["a", "b"])
    await fwd.forward_once()
    assert [m.topic.split("/")[0] for m in pub.published[3:]] == ["edge-meta", "edge"]
    assert [s["seq"] for s in samples_of_published(pub)] == [1, 2, 3, 4, 5, 6]


async def test_a_refused_metadata_message_keeps_the_record_until_it_is_delivered() -> None:
    buf, pub, fwd = await _forwarder(
        PayloadEncoder(AGENT, MqttConfig(layout="compact", topic="edge/gw/{device}"), epoch=EPOCH)
    )
    await _append(buf, "plc", 1, ["a", "b"])
    pub.fail_next(1, "Quota exceeded", code=0x97)  # the metadata, sent first
    await fwd.forward_once()
    assert buf.stats().records == 1  # not committed: its metadata was not delivered
    fwd.stats.backing_off["plc"].retry_at = 0
    await fwd.forward_once()
    assert buf.stats().records == 0
    # The retry carried the metadata again (before its data): a consumer that kept the
    # first data message (MetaMissing) decodes it once the retained metadata is there.
    assert [m.retain for m in pub.published] == [False, True, False]
    with pytest.raises(MetaMissing):
        Decoder().decode(pub.published[0].payload)
    assert [s["seq"] for s in samples_of_published(pub)] == [1, 2, 1, 2]


def samples_of_published(pub: FakePublisher) -> list[dict[str, Any]]:
    """As a consumer with the retained metadata at hand: metadata first, then data."""
    decoder = Decoder()
    for m in pub.published:
        if m.retain:
            decoder.decode(m.payload)
    out: list[dict[str, Any]] = []
    for m in pub.published:
        if not m.retain:
            out += decoder.decode(m.payload).samples
    return out


def test_topic_meta_with_an_unknown_field_is_reported_with_its_line() -> None:
    from agent.config import ConfigError, parse_config

    text = "agent: {id: gw}\nmqtt:\n  layout: compact\n  topic_meta: 'm/{device}/{meta}/{x}'\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yaml")
    assert any("c.yaml:4 mqtt.topic_meta: unknown field {x}" in p for p in err.value.problems)
