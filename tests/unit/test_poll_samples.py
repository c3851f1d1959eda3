"""A poll by columns (agent.samples.PollSamples) is the same samples and the same stored
bytes as the dicts the normaliser makes, whatever the values; LatestSamples keeps the
newest sample of every tag."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer import Gap
from agent.buffer.common import record_samples
from agent.buffer.record import RecordEncoder, record_columns
from agent.layouts import compact, lean
from agent.layouts.common import PayloadError
from agent.normalize import Columns, Normalizer, SeqCounter
from agent.runtime.latest import LatestSamples
from agent.samples import PollSamples
from drivers.base import RawReading, TagCommon
from tests.unit.test_buffer_record import batches

TS = datetime(2026, 12, 1, 14, 0, 0, 250000, tzinfo=UTC)

numbers_st = (
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(1 << 66), max_value=1 << 66),
    st.booleans(),
    st.none(),
)
values_st = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=0, max_value=65535),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
)


@st.composite
def polls(draw: Any) -> tuple[list[TagCommon], list[Any]]:
    n = draw(st.integers(min_value=1, max_value=12))
    tags = []
    for i in range(n):
        scaled = draw(st.booleans())
        tags.append(
            TagCommon(
                name=f"t{i}",
                unit=draw(st.sampled_from([None, "degC", "bar"])),
                scale=draw(st.sampled_from([0.1, 2.0, -1.0])) if scaled else 1.0,
                offset=draw(st.sampled_from([0.0, 5.0])) if scaled else 0.0,
            )
        )
    kind = draw(st.sampled_from(["floats", "ints", "numbers", "any"]))
    one = {
        "floats": st.floats(width=32, allow_nan=True),
        "ints": st.integers(min_value=-(1 << 66), max_value=1 << 66),
        "numbers": st.one_of(numbers_st),
        "any": values_st,
    }[kind]
    values = draw(st.lists(one, min_size=n, max_size=n))
    return tags, values


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b and type(a) is type(b))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(polls(), st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["zlib", "none"]))
def test_batch_is_the_samples_and_stores_the_same_bytes(
    poll: tuple[list[TagCommon], list[Any]], start: int, compression: Any
) -> None:
    tags, values = poll
    names = [t.name for t in tags]
    norm = Normalizer("press", tags)
    seq_a, seq_b = SeqCounter(start), SeqCounter(start)
    dicts = norm.samples(Columns(names, list(values)), TS, seq_a)
    batch = norm.batch(Columns(names, list(values)), TS, seq_b)
    assert isinstance(batch, PollSamples)
    assert seq_a.last == seq_b.last == batch.last_seq
    assert len(batch) == len(dicts)
    for x, y in zip(batch, dicts, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert same(x[key], y[key]), (key, x[key], y[key])  # type: ignore[literal-required]
    enc_a, enc_b = RecordEncoder(compression), RecordEncoder(compression)
    a = enc_a.encode(dicts, start)
    b = enc_b.encode(batch, start)
    assert (a.first_seq, a.last_seq, a.count) == (b.first_seq, b.last_seq, b.count)
    assert a.data == b.data
    assert a.dictionary == b.dictionary
    assert record_samples(b.full) == record_samples(a.full)


def test_later_polls_use_the_kept_dictionary_like_the_dict_path() -> None:
    tags = [TagCommon(name=f"r{i}", unit="bar" if i % 2 else None) for i in range(50)]
    names = [t.name for t in tags]
    norm = Normalizer("press", tags)
    seq_a, seq_b = SeqCounter(0), SeqCounter(0)
    enc_a, enc_b = RecordEncoder(), RecordEncoder()
    last = 0
    for k in range(5):
        vals: list[Any] = [k * 1000 + i for i in range(50)]
        if k == 3:
            vals[7] = 2.5  # the kinds change: a section of its own
        a = enc_a.encode(norm.samples(Columns(names, vals), TS, seq_a), last)
        b = enc_b.encode(norm.batch(Columns(names, vals), TS, seq_b), last)
        assert a.data == b.data
        assert a.dictionary == b.dictionary
        last = b.last_seq


def test_a_poll_with_bad_readings_takes_the_dict_path() -> None:
    norm = Normalizer("press", [TagCommon(name="a"), TagCommon(name="b")])
    cols = Columns(["a", "b"], [1, None], {1: RawReading("b", None, "bad", "timeout")})
    out = norm.batch(cols, TS, SeqCounter(0))
    assert isinstance(out, list)
    assert [s["quality"] for s in out] == ["good", "bad"]


def test_a_poll_below_the_last_seq_is_refused_naming_the_sample() -> None:
    norm = Normalizer("press", [TagCommon(name="a")])
    batch = norm.batch(Columns(["a"], [1]), TS, SeqCounter(9))
    with pytest.raises(ValueError, match="seq 10 of 'press'/'a' is not above 10"):
        RecordEncoder().encode(batch, 10)


def test_unknown_tag_raises_like_the_dict_path() -> None:
    norm = Normalizer("press", [TagCommon(name="a")])
    with pytest.raises(KeyError):
        norm.batch(Columns(["zz"], [1]), TS, SeqCounter(0))


def test_poll_samples_sequence_protocol() -> None:
    p = PollSamples("d", ["a", "b", "c"], [None, "V", None], [1, None, 3.5], TS, 7,
                    {1: ("bad", "not a number", None)}, {1: "NaN"})  # fmt: skip
    assert len(p) == 3
    assert p.last_seq == 9
    assert p[-1]["tag"] == "c"
    assert p[-1]["seq"] == 9
    assert p[1]["quality"] == "bad"
    assert p[1]["value_text"] == "NaN"
    assert p[1]["unit"] == "V"
    assert [s["seq"] for s in p[0:2]] == [7, 8]
    assert p == list(p)
    with pytest.raises(IndexError):
        p[3]
    p[0]["value"] = 99  # an item is a copy
    assert p[0]["value"] == 1


# ------------------------------------------------------------------ LatestSamples


def poll(tags: list[str], values: list[Any], first: int) -> PollSamples:
    return PollSamples("d", tags, [None] * len(tags), values, TS, first)


def test_latest_takes_the_newest_of_polls_and_single_samples() -> None:
    latest = LatestSamples()
    fast = ["a", "b"]
    slow = ["b", "c"]
    latest.put_poll(poll(fast, [1, 2], 1))
    latest.put_poll(poll(slow, [20, 30], 3))
    assert latest["a"]["value"] == 1
    assert latest["b"]["value"] == 20
    latest.put_poll(poll(fast, [5, 6], 5))
    assert latest["b"]["value"] == 6
    assert latest["c"]["value"] == 30
    single = poll(["b"], [None], 7)[0]
    single["quality"] = "bad"
    latest.put(single)
    assert latest["b"]["quality"] == "bad"
    assert set(latest) == {"a", "b", "c"}
    assert len(latest) == 3
    assert "c" in latest
    assert "zz" not in latest
    assert latest.get("zz") is None
    del latest["c"]
    assert "c" not in latest
    assert len(latest) == 2
    with pytest.raises(KeyError):
        del latest["c"]


def test_latest_replaces_an_equal_tag_list_and_stays_bounded() -> None:
    latest = LatestSamples()
    for k in range(200):
        latest.put_poll(poll(["a", "b"], [k, k], 2 * k + 1))  # a new list every time
    assert latest["a"]["value"] == 199
    assert len(latest._polls) == 1
    for k in range(100):
        latest.put_poll(poll([f"x{k}"], [k], 1000 + k))  # 100 distinct groups
    assert len(latest._polls) <= 32
    assert latest["x99"]["value"] == 99


# ------------------------------------------------------- lean layout from the columns


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.booleans(), st.booleans())
def test_lean_from_columns_is_the_same_message_as_from_dicts(
    samples: list[dict[str, Any]], historical: bool, with_gaps: bool
) -> None:
    data = RecordEncoder().encode(samples, 0).full  # type: ignore[arg-type]
    gaps = [Gap(3, 9, 7, "drop_oldest", epoch="e0")] if with_gaps else []
    head = {"schema": lean.SCHEMA, "agent": "edge-1"}
    cols = record_columns(data)
    fast = lean.encode_columns(head, "press1", "e1", cols, historical=historical, gaps=gaps)
    slow = lean.encode(head, "press1", "e1", record_samples(data), historical=historical, gaps=gaps)
    assert fast == slow
    # Another device's record, or a tag twice: the dicts decide.
    assert lean.encode_columns(head, "other", "e1", cols, historical=False, gaps=[]) is None


def test_payload_encoder_takes_the_columns_path_and_the_dicts_for_json_bodies() -> None:
    from agent.buffer import Record
    from agent.config import AgentSection, MqttConfig
    from agent.payload import PayloadEncoder

    enc = PayloadEncoder(AgentSection(id="edge-1"), MqttConfig(), epoch="e1")
    norm = Normalizer("press", [TagCommon(name="a", unit="bar"), TagCommon(name="b")])
    poll = norm.batch(Columns(["a", "b"], [1.5, float("nan")]), TS, SeqCounter(0))
    columnar = RecordEncoder().encode(poll, 0).full
    as_json = RecordEncoder().encode([*poll, {**poll[0], "seq": 3, "device": "x"}], 0).full
    for data in (columnar, as_json):
        record = Record(1, "press", 1, 2, 2, 0.0, data)
        (msg,) = enc.encode(record)
        body = orjson.loads(msg.payload)
        assert body["values"][:2] == [1.5, None]
        assert body["extra"][0]["quality"] == "bad"
    bad = Record(2, "press", 1, 2, 2, 0.0, columnar[:-3])
    with pytest.raises(PayloadError, match="record 2"):
        enc.encode(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), batches(), st.booleans())
def test_compact_from_columns_is_the_same_mapping_and_message_as_from_dicts(
    first: list[dict[str, Any]], second: list[dict[str, Any]], historical: bool
) -> None:
    head = {"schema": compact.SCHEMA, "agent": "edge-1"}
    by_dicts, by_cols = compact.Mapping(), compact.Mapping()
    for samples in (first, second, first):
        data = RecordEncoder().encode(samples, 0).full  # type: ignore[arg-type]
        dicts, cols = record_samples(data), record_columns(data)
        changed = by_dicts.update(dicts)
        assert by_cols.update_columns(cols.tags, cols.units, cols.values) == changed
        assert by_cols.entries == by_dicts.entries
        assert by_cols.id == by_dicts.id
        assert by_cols.covers_tags(cols.tags)
        slow = compact.encode(head, "press1", "e1", by_dicts, dicts, historical=historical, gaps=[])
        fast = compact.encode_columns(
            head, "press1", "e1", by_cols, cols, historical=historical, gaps=[]
        )
        assert fast == slow
    assert compact.encode_columns(head, "x", "e1", by_cols, cols, historical=False, gaps=[]) is None


def test_a_tag_read_twice_in_one_poll_is_stored_as_json_like_the_dict_path() -> None:
    # A driver that hands the same tag twice: no dictionary index can tell them apart,
    # so the batch falls back to a JSON body, exactly as the dicts do.
    norm = Normalizer("press", [TagCommon(name="a"), TagCommon(name="b")])
    names = ["a", "b", "a"]
    dicts = norm.samples(Columns(names, [1, 2, 3]), TS, SeqCounter(0))
    batch = norm.batch(Columns(names, [1, 2, 3]), TS, SeqCounter(0))
    a, b = RecordEncoder().encode(dicts, 0), RecordEncoder().encode(batch, 0)
    assert a.data == b.data
    assert b.dictionary == b""  # a JSON body
    latest = LatestSamples()
    assert isinstance(batch, PollSamples)
    latest.put_poll(batch)
    assert latest["a"]["value"] == 3


def test_values_of_types_no_layout_carries_are_made_bad_like_the_dict_path() -> None:
    from decimal import Decimal

    norm = Normalizer("press", [TagCommon(name=t) for t in "abcd"])
    vals: list[Any] = [b"\x00\x01", Decimal("1.5"), object(), "caf\udce9"]
    dicts = norm.samples(Columns(list("abcd"), list(vals)), TS, SeqCounter(0))
    batch = norm.batch(Columns(list("abcd"), list(vals)), TS, SeqCounter(0))
    assert list(batch) == dicts
    assert all(s["quality"] == "bad" and s["value"] is None for s in batch)
    assert RecordEncoder().encode(batch, 0).data == RecordEncoder().encode(dicts, 0).data


# ------------------------------------------------- the writer, with garbage from a driver


@pytest.mark.parametrize(
    ("tags", "values", "why"),
    [
        (["a", "b"], [1], "values for"),  # fewer values than tags
        (["a", "zz"], [1, 2], "zz"),  # a tag the device does not have
    ],
)
async def test_garbage_columns_are_counted_and_the_other_devices_go_on(
    tmp_path: Path, tags: list[str], values: list[Any], why: str
) -> None:
    from structlog.testing import capture_logs

    from agent.buffer.memory import MemoryBuffer
    from agent.config import BufferConfig
    from agent.runtime.writer import BufferWriter

    buffer = MemoryBuffer(BufferConfig(path=str(tmp_path / "b.db"), kind="memory"))
    await buffer.open()
    stored: list[tuple[str, int, str | None]] = []
    writer = BufferWriter(
        buffer, lambda dev, n, err: stored.append((dev, n, None if err is None else str(err)))
    )
    bad_sink, _ = writer.sink("bad", Normalizer("bad", [TagCommon(name="a"), TagCommon(name="b")]),
                              SeqCounter(0))  # fmt: skip
    good_sink, good_latest = writer.sink("good", Normalizer("good", [TagCommon(name="x")]),
                                         SeqCounter(0))  # fmt: skip
    task = asyncio.create_task(writer.run())
    with capture_logs() as logs:
        await bad_sink(Columns(tags, values))
        await good_sink(Columns(["x"], [7]))
        await writer.stop()
        await asyncio.wait_for(task, 5)
    bad = [s for s in stored if s[0] == "bad"]
    assert len(bad) == 1
    assert bad[0][1] == len(tags)
    assert bad[0][2] is not None
    assert why in bad[0][2]
    assert [e for e in logs if e["event"] == "normalize.failed" and e["device"] == "bad"]
    assert ("good", 1, None) in stored
    assert good_latest["x"]["value"] == 7
    (record,) = await buffer.take(10)
    assert record_samples(record.data)[0]["device"] == "good"


@pytest.mark.parametrize(
    ("device", "tags", "units"),
    [("d", [1], [None]), (7, ["a"], [None]), ("d", ["a"], [3])],
)
def test_a_dictionary_with_names_that_are_not_text_is_corrupt(
    device: Any, tags: Any, units: Any
) -> None:
    # Checked once per dictionary (the readers by columns rely on it), even when its
    # checksum is right: the encoder never writes such a dictionary.
    from agent.buffer.record import CorruptRecord, check_dictionary, dictionary_blob

    with pytest.raises(CorruptRecord, match="not text"):
        check_dictionary(dictionary_blob(device, tags, units, b"\x02"))
