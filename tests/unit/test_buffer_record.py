"""The record codec (agent/buffer/record.py): every value kind survives exactly as format
2 (the JSON array) delivered it, damage is detected, the columnar accessor agrees."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer.common import record_json, record_samples
from agent.buffer.record import (
    CorruptRecord,
    RecordEncoder,
    check_body,
    encode_samples,
    join,
    record_columns,
    samples_of_columns,
    split_record,
)

OPTS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=9)), timezone(timedelta(hours=-5, minutes=-30))]
)
TIMES = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1), timezones=ZONES
)

#: Ints of every width the codec packs (u8 … u64, i8 … i64), one width per record so
#: that the columnar path (not the JSON fallback) carries them.
INT_RANGES = [
    (0, 255),
    (0, 65535),
    (0, 2**32 - 1),
    (0, 2**64 - 1),
    (-128, 127),
    (-(2**15), 2**15 - 1),
    (-(2**31), 2**31 - 1),
    (-(2**63), 2**63 - 1),
]


def oracle(samples: list[dict[str, Any]]) -> Any:
    """What format 2 delivered for these samples: the JSON array, decoded."""
    return orjson.loads(orjson.dumps(samples, option=OPTS))


@st.composite
def values_of_one_kind(draw: st.DrawFn, n: int) -> list[Any]:
    kind = draw(st.sampled_from(["bool", "int", "float", "str", "list", "mixed"]))
    if kind == "bool":
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if kind == "int":
        lo, hi = draw(st.sampled_from(INT_RANGES))
        return draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    if kind == "float":
        return draw(st.lists(st.floats(), min_size=n, max_size=n))  # NaN, ±Inf included
    if kind == "str":
        return draw(st.lists(st.text(max_size=12), min_size=n, max_size=n))
    if kind == "list":
        item = st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=False), st.booleans())
        return draw(st.lists(st.lists(item, max_size=4), min_size=n, max_size=n))
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**31), 2**31),
        st.floats(width=32),
        st.floats(),
        st.text(max_size=6),
        st.lists(st.integers(0, 9), max_size=3),
    )
    return draw(st.lists(scalar, min_size=n, max_size=n))


@st.composite
def batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 24))
    tags = draw(st.lists(st.text(min_size=1, max_size=10), min_size=n, max_size=n, unique=True))
    values = draw(values_of_one_kind(n))
    one_ts = draw(st.booleans())
    ts = draw(TIMES)
    first = draw(st.integers(1, 2**40))
    steps = draw(
        st.one_of(st.just([1] * n), st.lists(st.integers(1, 2**20), min_size=n, max_size=n))
    )
    seq = first
    out = []
    for i in range(n):
        bad = draw(st.integers(0, 9)) == 0
        s: dict[str, Any] = {
            "device": "press1",
            "tag": tags[i],
            "value": None if bad and draw(st.booleans()) else values[i],
            "quality": draw(st.sampled_from(["bad", "uncertain"])) if bad else "good",
            "reason": draw(st.one_of(st.none(), st.text(max_size=8))) if bad else None,
            "code": draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))) if bad else None,
            "ts_source": draw(st.one_of(st.none(), TIMES)),
            "ts_agent": ts if one_ts else draw(TIMES),
            "unit": draw(st.one_of(st.none(), st.sampled_from(["bar", "°C", "", "m³/h"]))),
            "seq": seq,
        }
        if draw(st.integers(0, 9)) == 0:
            s["value_text"] = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
        out.append(s)
        seq += steps[i] if i + 1 < n else 0
    return out


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["zlib", "none"]))
def test_every_value_kind_round_trips_exactly_as_format_2(
    samples: list[dict[str, Any]], compression: Any
) -> None:
    encoder = RecordEncoder(compression)
    batch = encoder.encode(samples, 0)  # type: ignore[arg-type]
    assert (batch.first_seq, batch.last_seq, batch.count) == (
        samples[0]["seq"],
        samples[-1]["seq"],
        len(samples),
    )
    expected = oracle(samples)
    assert record_samples(batch.full) == expected
    assert orjson.loads(record_json(batch.full)) == expected
    # The columnar view says the same, without one dict per value.
    assert samples_of_columns(record_columns(batch.full)) == expected
    # The stored body and its dictionary, joined again as the buffer does at take.
    assert record_samples(join(batch.dictionary, batch.data)) == expected
    # The same poll again reuses the device's dictionary (one comparison, same blob).
    again = encoder.encode(samples, 0)  # type: ignore[arg-type]
    assert again.dictionary == batch.dictionary
    assert record_samples(again.full) == expected


@given(batches())
def test_columnar_path_carries_ordinary_batches(samples: list[dict[str, Any]]) -> None:
    """No JSON fallback for batches of one device with the Sample fields: the columnar
    form (with a dictionary) is what the buffer stores."""
    batch = RecordEncoder().encode(samples, 0)  # type: ignore[arg-type]
    assert batch.dictionary
    assert not check_body(batch.data).json


def test_ts_source_and_ts_agent_survive_exactly() -> None:
    ts = datetime(2026, 11, 30, 8, 0, 0, 123456, tzinfo=UTC)
    samples = [
        sample(1, 7, ts_source=ts - timedelta(milliseconds=3), ts_agent=ts),
        sample(2, 8, ts_source=None, ts_agent=ts),
        sample(3, 9, ts_source=datetime(2026, 1, 1, 9, tzinfo=timezone(timedelta(hours=9)))),
        sample(4, 1, ts_source=datetime(2026, 1, 1, 9, 0, 0)),  # naive: UTC, as format 2
    ]
    got = record_samples(RecordEncoder().encode(samples, 0).full)  # type: ignore[arg-type]
    assert [s["ts_source"] for s in got] == [
        "2026-11-30T08:00:00.120456Z",
        None,
        "2026-01-01T09:00:00+09:00",
        "2026-01-01T09:00:00Z",
    ]
    assert got == oracle(samples)


def test_nan_and_infinity_read_as_format_2_did() -> None:
    samples = [sample(i + 1, v) for i, v in enumerate([float("nan"), float("inf"), -1.5])]
    samples[0]["value_text"] = "NaN"
    got = record_samples(RecordEncoder().encode(samples, 0).full)  # type: ignore[arg-type]
    assert [s["value"] for s in got] == [None, None, -1.5]
    assert got[0]["value_text"] == "NaN"
    assert "value_text" not in got[1]


def test_uint16_counters_take_two_bytes_a_value() -> None:
    samples = [sample(i + 1, (i * 37) % 65536, tag=f"c{i:04d}") for i in range(1000)]
    batch = RecordEncoder("none").encode(samples, 0)  # type: ignore[arg-type]
    # 2 bytes a value, plus the header, the checksum and one ts_agent.
    assert 2000 < len(batch.data) < 2100
    assert record_samples(batch.full) == oracle(samples)


def test_batches_the_columns_cannot_carry_are_stored_as_json_exactly() -> None:
    mixed_devices = [sample(1, 1), {**sample(2, 2), "device": "oven"}]
    extra_key = [{**sample(1, 1), "note": "x"}]
    beyond_64_bits = [sample(1, -(2**63)), sample(2, 2**64 - 1)]
    for samples in (mixed_devices, extra_key, beyond_64_bits):
        batch = RecordEncoder().encode(samples, 0)  # type: ignore[arg-type]
        assert check_body(batch.data).json
        assert batch.dictionary == b""
        assert record_samples(batch.full) == oracle(samples)


def test_values_format_2_refused_are_refused() -> None:
    for bad in (2**64, -(2**63) - 1, "\ud800", object()):
        with pytest.raises(TypeError):
            orjson.dumps([sample(1, bad)], option=OPTS)
        with pytest.raises(TypeError):
            RecordEncoder().encode([sample(1, bad)], 0)  # type: ignore[list-item]


def test_bad_seqs_are_refused() -> None:
    enc = RecordEncoder()
    with pytest.raises(ValueError, match="empty batch"):
        enc.encode([], 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        enc.encode([sample(5, 1), sample(5, 2)], 0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not above 9"):
        enc.encode([sample(9, 1)], 9)  # type: ignore[list-item]


def test_tag_subsets_and_changes_of_a_device_stay_exact() -> None:
    enc = RecordEncoder()
    full = [sample(i + 1, i, tag=f"t{i}") for i in range(10)]
    first = enc.encode(full, 0)  # type: ignore[arg-type]
    subset = [sample(20 + j, i, tag=f"t{i}") for j, i in enumerate((7, 2, 5))]
    part = enc.encode(subset, 0)  # type: ignore[arg-type]
    assert part.dictionary == first.dictionary  # indices into the same dictionary
    assert record_samples(part.full) == oracle(subset)
    renamed = [sample(40, 1, tag="new")]
    other = enc.encode(renamed, 0)  # type: ignore[arg-type]
    assert other.dictionary != first.dictionary
    assert record_samples(other.full) == oracle(renamed)
    # The older record still decodes: it carries its own dictionary.
    assert record_samples(first.full) == oracle(full)


def test_every_damaged_byte_is_detected() -> None:
    samples = [sample(i + 1, i * 3, tag=f"t{i}") for i in range(12)]
    samples[3]["quality"], samples[3]["reason"] = "bad", "timeout"
    for compression in ("zlib", "none"):
        data = RecordEncoder(compression).encode(samples, 0).full  # type: ignore[arg-type]
        record_samples(data)
        for i in range(len(data)):
            damaged = bytearray(data)
            damaged[i] ^= 0xFF
            # A damaged magic reads as no record at all ("not a record"), else the
            # checks name what failed.
            with pytest.raises(ValueError, match=r"record|dictionary"):
                record_samples(bytes(damaged))
            with pytest.raises(ValueError, match=r"record|dictionary"):
                record_columns(bytes(damaged))
        with pytest.raises(CorruptRecord, match=r"truncated|length"):
            record_samples(data[:-1])
        with pytest.raises(CorruptRecord, match="length"):
            record_samples(data + b"\0")


def test_a_body_with_another_dictionary_is_refused() -> None:
    a = RecordEncoder().encode([sample(1, 1, tag="a")], 0)  # type: ignore[list-item]
    b = RecordEncoder().encode([sample(2, 1, tag="b")], 0)  # type: ignore[list-item]
    with pytest.raises(CorruptRecord, match="another dictionary"):
        join(b.dictionary, a.data)
    with pytest.raises(CorruptRecord, match="another dictionary"):
        record_samples(b.dictionary + a.data)
    with pytest.raises(CorruptRecord, match="without its dictionary"):
        record_samples(a.data)


def test_split_record_and_encode_samples() -> None:
    samples = [sample(i + 1, float(i), tag=f"t{i}") for i in range(6)]
    batch = RecordEncoder().encode(samples, 0)  # type: ignore[arg-type]
    assert split_record(batch.full) == (batch.dictionary, batch.data)
    decoded = record_samples(batch.full)
    # The forwarder's split: sub-records made from decoded samples decode to them.
    left, right = encode_samples(decoded[:3]), encode_samples(decoded[3:])
    assert record_samples(left) + record_samples(right) == decoded


def test_format_2_data_still_decodes() -> None:
    samples = [sample(1, 1.5), sample(2, True)]
    legacy = orjson.dumps(samples, option=OPTS)
    assert record_samples(legacy) == oracle(samples)
    assert record_json(legacy) is legacy
    with pytest.raises(ValueError, match="not a record"):
        record_samples(b"{}")


def sample(seq: int, value: Any, *, tag: str = "t", **kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "device": "press1",
        "tag": tag if tag != "t" else f"t{seq}",
        "value": value,
        "quality": "good",
        "reason": None,
        "code": None,
        "ts_source": None,
        "ts_agent": datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC),
        "unit": "bar",
        "seq": seq,
    }
    s.update(kw)
    return s
