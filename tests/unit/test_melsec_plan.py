"""Request planning: batch reads within the frame limits, random reads where they save."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.melsec.config import MelsecDevice
from drivers.melsec.plan import format_plan, plan_device


def make(tags: list[dict[str, Any]], **keys: Any) -> MelsecDevice:
    return MelsecDevice.model_validate(
        {
            "name": "plc",
            "protocol": "melsec",
            "series": keys.pop("series", "q"),
            "host": "127.0.0.1",
            "port": 5000,
            "tags": tags,
            **keys,
        }
    )


def described(device: MelsecDevice, group: str = "default") -> list[str]:
    return [r.describe() for r in plan_device(device).groups[group].requests]


def five_hundred() -> list[dict[str, Any]]:
    """500 tags across word and bit areas: the issue's reference config."""
    tags: list[dict[str, Any]] = []
    tags += [{"name": f"d{i}", "address": f"D{i}"} for i in range(300)]
    tags += [
        {"name": f"f{i}", "address": f"D{1000 + 2 * i}", "type": "float32"} for i in range(100)
    ]
    tags += [{"name": f"m{i}", "address": f"M{i}"} for i in range(50)]
    tags += [{"name": f"x{i}", "address": f"X{i:X}"} for i in range(50)]
    return tags


def test_five_hundred_tags_need_two_requests() -> None:
    # D0..D299 is one batch read; the 100 floats (100 dword points), M0..M49 (4 words)
    # and X0..X31 (4 words) fit one random read of 108 points.
    assert described(make(five_hundred())) == [
        "D0..D299 (300 words, 300 tags)",
        "random 8 words + 100 dwords (200 tags)",
    ]
    assert described(make(five_hundred(), random_read=False)) == [
        "M0..M49 (50 bits, 50 tags)",
        "X0..X31 (50 bits, 50 tags)",
        "D0..D299 (300 words, 300 tags)",
        "D1000..D1199 (200 words, 100 tags)",
    ]


def test_word_reads_stop_at_960_words() -> None:
    tags = [{"name": f"d{i}", "address": f"D{i}"} for i in range(961)]
    assert described(make(tags, random_read=False)) == [
        "D0..D959 (960 words, 960 tags)",
        "D960..D960 (1 word, 1 tag)",
    ]
    assert len(described(make(tags, random_read=False, max_words_per_request=100))) == 10


def test_bit_reads_stop_at_the_series_cap() -> None:
    tags = [{"name": f"m{i}", "address": f"M{i}"} for i in range(3585)]
    assert described(make(tags, random_read=False)) == ["M0..M3584 (3585 bits, 3585 tags)"]
    assert described(make(tags, series="iq-f", random_read=False)) == [
        "M0..M3583 (3584 bits, 3584 tags)",
        "M3584..M3584 (1 bit, 1 tag)",
    ]


def test_x_is_described_in_the_series_notation() -> None:
    tags = [{"name": "a", "address": "X17"}, {"name": "b", "address": "X20"}]
    assert described(make(tags, series="iq-f", random_read=False)) == ["X17..X20 (2 bits, 2 tags)"]
    assert described(make(tags, series="q", random_read=False)) == ["X17..X20 (10 bits, 2 tags)"]


def test_a_gap_larger_than_max_gap_splits() -> None:
    tags = [{"name": "a", "address": "D0"}, {"name": "b", "address": "D17"}]
    assert described(make(tags, random_read=False)) == ["D0..D17 (18 words, 2 tags)"]
    assert described(make(tags, random_read=False, max_gap=15)) == [
        "D0..D0 (1 word, 1 tag)",
        "D17..D17 (1 word, 1 tag)",
    ]


def test_random_read_pools_scattered_reads_and_respects_192_points() -> None:
    tags = [{"name": f"d{i}", "address": f"D{100 * i}"} for i in range(200)]
    requests = plan_device(make(tags)).groups["default"].requests
    assert [r.describe() for r in requests] == [
        "random 192 words + 0 dwords (192 tags)",
        "random 8 words + 0 dwords (8 tags)",
    ]
    assert len(requests[0].body) == 2 + 4 * 192


def test_strings_and_64_bit_values_stay_batch_reads() -> None:
    tags: list[dict[str, Any]] = [
        {"name": "s", "address": "D0", "type": "string", "length": 4},
        {"name": "q", "address": "D100", "type": "float64"},
        {"name": "a", "address": "D200"},
    ]
    assert described(make(tags)) == [
        "D0..D3 (4 words, 1 tag)",
        "D100..D103 (4 words, 1 tag)",
        "D200..D200 (1 word, 1 tag)",
    ]


def test_one_read_is_never_replaced_by_a_random_read() -> None:
    assert described(make([{"name": "a", "address": "D5"}])) == ["D5..D5 (1 word, 1 tag)"]


def test_tags_sharing_a_word_share_the_read() -> None:
    tags = [
        {"name": "w", "address": "D10", "type": "uint16"},
        {"name": "b0", "address": "D10.0"},
        {"name": "bf", "address": "D10.F"},
        {"name": "m", "address": "M3"},
    ]
    (request,) = plan_device(make(tags)).groups["default"].requests
    assert request.describe() == "random 2 words + 0 dwords (4 tags)"


def test_groups_are_planned_apart_and_undeclared_groups_are_refused() -> None:
    tags = [
        {"name": "a", "address": "D0"},
        {"name": "b", "address": "D1", "group": "slow"},
    ]
    device = make(tags, poll_groups={"slow": {"interval_s": 10.0}})
    assert described(device) == ["D0..D0 (1 word, 1 tag)"]
    assert described(device, "slow") == ["D1..D1 (1 word, 1 tag)"]
    with pytest.raises(ValueError, match="poll group 'fast' is not declared"):
        plan_device(make([{"name": "a", "address": "D0", "group": "fast"}]))


def test_a_value_larger_than_the_cap_is_a_config_error() -> None:
    tags = [{"name": "s", "address": "D0", "type": "string", "length": 200}]
    with pytest.raises(ValueError, match="tag 's': a string of 200 words is larger than the 100"):
        plan_device(make(tags, max_words_per_request=100))


def test_format_plan_shows_each_request() -> None:
    tags: list[dict[str, Any]] = [
        {"name": "a", "address": "D0"},
        {"name": "b", "address": "M0"},
        {"name": "s", "address": "D500", "type": "string", "length": 8, "group": "slow"},
    ]
    device = make(tags, poll_groups={"slow": {"interval_s": 10.0}}, network=1, station=2)
    assert format_plan(device) == (
        "device plc (melsec q 3E 127.0.0.1:5000 network 1 station 2, 3 tags)\n"
        "  group default every 1 s: 2 tags, 1 request per poll\n"
        "    random 2 words + 0 dwords (2 tags)\n"
        "      instead of M0..M0 (1 bit, 1 tag)\n"
        "      instead of D0..D0 (1 word, 1 tag)\n"
        "  group slow every 10 s: 1 tag, 1 request per poll\n"
        "    D500..D507 (8 words, 1 tag)\n"
        "  total: 1.1 requests/s"
    )


_FAMILIES = ["D", "W", "R", "M", "X", "B", "TN", "SD"]
_TYPES = ["int16", "uint32", "float32", "float64", "bool", "string"]


@st.composite
def tag_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 40))):
        family = draw(st.sampled_from(_FAMILIES))
        number = draw(st.integers(0, 4000))
        tag: dict[str, Any] = {"name": f"t{i}", "address": f"{family}{number:X}"}
        if family in ("D", "W", "R", "TN", "SD"):
            if family in ("D", "R", "TN", "SD"):
                tag["address"] = f"{family}{number}"
            t = draw(st.sampled_from(_TYPES))
            if t == "bool":
                tag["address"] += f".{draw(st.integers(0, 15)):X}"
            elif t == "string":
                tag.update(type=t, length=draw(st.integers(1, 8)))
            else:
                tag["type"] = t
        elif family == "M":
            tag["address"] = f"M{number}"
        out.append(tag)
    return out


@settings(max_examples=60, deadline=None)
@given(tag_sets(), st.integers(0, 40), st.booleans(), st.integers(8, 960))
def test_every_tag_is_read_once_within_the_frame_limits(
    tags: list[dict[str, Any]], gap: int, random_read: bool, max_words: int
) -> None:
    device = make(tags, max_gap=gap, random_read=random_read, max_words_per_request=max_words)
    requests = plan_device(device).groups["default"].requests
    slots = [s for r in requests for s in r.slots]
    assert sorted(s.index for s in slots) == list(range(len(tags)))
    for r in requests:
        if r.mode == "words":
            assert r.count <= max_words
        elif r.mode == "bits":
            assert r.count <= 7168
        else:
            assert r.points <= 192
            assert len(r.parts) >= 2
        for s in r.slots:
            assert s.codec.end() <= r.data_length
    if random_read:
        assert len(requests) <= len(plan_device(make(tags, max_gap=gap, random_read=False,
                                                     max_words_per_request=max_words))
                                    .groups["default"].requests)  # fmt: skip
