"""XGT config (addresses, areas per CPU) and request planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import ConfigError, parse_config
from bench.xgt_poll import tags as bench_tags
from drivers.xgt.config import Address, XgtDevice
from drivers.xgt.plan import clusters, format_plan, plan_device, plan_requests, sub_request


def device(tags: list[dict[str, Any]], **extra: Any) -> XgtDevice:
    fields: dict[str, Any] = {"name": "plc", "protocol": "xgt", "host": "10.0.0.5", "tags": tags}
    fields.update(extra)
    return XgtDevice.model_validate(fields)


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "area", "size", "offset", "byte"),
    [
        ("%MW100", "M", "W", 100, 200),
        ("%DD20", "D", "D", 20, 80),
        ("%ML3", "M", "L", 3, 24),
        ("%PB7", "P", "B", 7, 7),
        ("%MX1601", "M", "X", 1601, 200),  # word 100, bit 1 (manual: %MX2764 = 172 x 16 + 12)
        ("%mw5", "M", "W", 5, 10),
    ],
)
def test_direct_variables(text: str, area: str, size: str, offset: int, byte: int) -> None:
    addr = Address.parse(text)
    assert (addr.area, addr.size, addr.offset, addr.byte_offset) == (area, size, offset, byte)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MW100", "use a direct variable"),
        ("%MQ1", "use a direct variable"),
        ("%IX0.1.5", "dotted notation"),
        ("%MW", "use a direct variable"),
    ],
)
def test_bad_addresses_say_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Address.parse(text)


def test_default_types_by_size_letter_and_wider_types() -> None:
    d = device(
        [
            {"name": "w", "address": "%MW0"},
            {"name": "x", "address": "%MX17"},
            {"name": "f", "address": "%DW10", "type": "float32"},
            {"name": "l", "address": "%DL1"},
        ]
    )
    assert [t.resolved_type() for t in d.tags] == ["uint16", "bool", "float32", "uint64"]
    assert [t.byte_count() for t in d.tags] == [2, 1, 4, 8]


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ({"address": "%MX3", "type": "int16"}, "is a bit: its type is bool"),
        ({"address": "%MW3", "type": "bool"}, "type bit with 'bit'"),
        ({"address": "%MW3", "type": "bit"}, "needs 'bit'"),
        ({"address": "%MB3", "type": "bit", "bit": 9}, "outside %MB3"),
        ({"address": "%MD3", "type": "int16"}, "narrower than %MD3"),
        ({"address": "%MW3", "type": "string"}, "needs 'length'"),
        ({"address": "%MW3", "length": 2}, "only for type string"),
    ],
)
def test_tag_mistakes(tag: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        device([{"name": "t", **tag}])


def test_areas_follow_the_cpu_type() -> None:
    with pytest.raises(ValidationError, match="area I is not served by XGK"):
        device([{"name": "t", "address": "%IX0"}])
    with pytest.raises(ValidationError, match="area D is not served by XGI"):
        device([{"name": "t", "address": "%DW0"}], cpu="XGI")
    with pytest.raises(ValidationError, match=r"no bit access to area D; read the word \(%DW6\)"):
        device([{"name": "t", "address": "%DX100"}])
    assert device([{"name": "t", "address": "%IX0"}, {"name": "q", "address": "%QW2"}], cpu="XGI")


def test_config_errors_have_file_and_line() -> None:
    text = """\
agent: {id: gw}
devices:
  - name: press
    protocol: xgt
    host: 10.0.0.5
    cpu: XGQ
    tags:
      - {name: t, address: "%MW1"}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line4.yaml")
    assert any(p.startswith("line4.yaml:6 devices[0].cpu") for p in info.value.problems), (
        info.value.problems
    )


# ---------------------------------------------------------------- planning


def test_neighbouring_words_and_bits_of_one_area_are_one_continuous_read() -> None:
    d = device(
        [
            {"name": "a", "address": "%MW100"},
            {"name": "b", "address": "%MW101", "type": "int16"},
            {"name": "run", "address": "%MX1616"},  # bit 0 of word 101
            {"name": "f", "address": "%MW102", "type": "float32"},
        ]
    )
    (request,) = plan_device(d).groups["default"].requests
    assert (request.kind, request.start_variable, request.count) == ("continuous", "%MB200", 8)
    assert [(s.tag, s.offset, s.spec.bit) for s in request.slots] == [
        ("a", 0, 0),
        ("b", 2, 0),
        ("run", 2, 0),
        ("f", 4, 0),
    ]


def test_gap_and_cap_split_blocks() -> None:
    tags = [{"name": "a", "address": "%MW0"}, {"name": "b", "address": "%MW10"}]
    apart = plan_requests(device(tags).tags, max_gap=0)
    assert [r.describe() for r in apart] == ["individual W x 2 (%MW0 %MW10; 2 tags)"]
    merged = plan_requests(device(tags).tags, max_gap=18)
    assert [r.describe() for r in merged] == ["continuous %MB0 x 22 bytes (2 tags)"]
    capped = plan_requests(
        device([{"name": f"w{i}", "address": f"%DW{i}"} for i in range(1000)]).tags
    )
    assert [(r.start, r.count) for r in capped] == [(0, 1400), (1400, 600)]


def test_scattered_words_and_bits_become_individual_reads_of_16() -> None:
    tags = [{"name": f"w{i}", "address": f"%DW{i * 100}"} for i in range(20)]
    tags += [{"name": f"t{i}", "address": f"%TX{i}"} for i in range(3)]  # timer contacts
    tags += [{"name": "alone", "address": "%KW5"}]
    requests = plan_requests(device(tags).tags)
    assert [r.describe() for r in requests] == [
        "individual W x 16 (%DW0 %DW100 %DW200 %DW300 ...; 16 tags)",
        "individual W x 5 (%DW1600 %DW1700 %DW1800 %DW1900 ...; 5 tags)",
        "individual X x 3 (%TX0 %TX1 %TX2; 3 tags)",
    ]
    assert requests[1].variables[-1] == "%KW5"


def test_a_single_timer_contact_is_an_individual_read_and_its_value_a_block() -> None:
    tags = [{"name": "done", "address": "%TX7"}, {"name": "elapsed", "address": "%TW7"}]
    requests = plan_requests(device(tags).tags)
    assert [r.describe() for r in requests] == [
        "continuous %TB14 x 2 bytes (1 tag)",
        "individual X x 1 (%TX7; 1 tag)",
    ]


def test_a_value_larger_than_the_cap_is_a_config_error() -> None:
    d = device(
        [{"name": "s", "address": "%DB0", "type": "string", "length": 100}],
        max_bytes_per_request=64,
    )
    with pytest.raises(ValueError, match="'s': a value of 100 bytes is larger than the 64"):
        plan_device(d)


def test_five_hundred_tags_across_word_and_bit_areas_plan_to_the_minimum() -> None:
    tags: list[dict[str, Any]] = []
    tags += [{"name": f"d{i}", "address": f"%DW{i}", "type": "int16"} for i in range(300)]
    tags += [{"name": f"m{i}", "address": f"%MX{i}"} for i in range(100)]
    tags += [{"name": f"p{i}", "address": f"%PX{i}"} for i in range(64)]
    tags += [
        {"name": f"f{i}", "address": f"%MW{100 + 2 * i}", "type": "float32"} for i in range(36)
    ]
    d = device(tags, interval_s=0.1)
    (group,) = plan_device(d).groups.values()
    # D: 600 bytes; M: bits 0-99 (13 bytes) and floats at bytes 200-343 (gap > 0: 2 blocks);
    # P: 8 bytes. 4 requests for 500 tags.
    assert [r.describe() for r in group.requests] == [
        "continuous %DB0 x 600 bytes (300 tags)",
        "continuous %MB0 x 13 bytes (100 tags)",
        "continuous %MB200 x 144 bytes (36 tags)",
        "continuous %PB0 x 8 bytes (64 tags)",
    ]
    text = format_plan(d)
    assert "500 tags, 4 requests per poll" in text
    assert "total: 40 requests/s" in text


def test_clusters_and_sub_requests() -> None:
    tags = [
        {"name": "a", "address": "%MX8"},
        {"name": "b", "address": "%MX9"},  # same byte as a: one cluster
        {"name": "c", "address": "%MW1"},
        {"name": "d", "address": "%MW2"},
    ]
    (request,) = plan_requests(device(tags).tags)
    parts = clusters(request)
    assert [[s.tag for s in c] for c in parts] == [["a", "b"], ["c"], ["d"]]
    sub = sub_request(request, [*parts[1], *parts[2]])
    assert (sub.start_variable, sub.count, [s.offset for s in sub.slots]) == ("%MB2", 4, [0, 2])
    words = plan_requests(
        device([{"name": f"w{i}", "address": f"%DW{i * 10}"} for i in range(3)]).tags
    )
    (individual,) = words
    assert [[s.tag for s in c] for c in clusters(individual)] == [["w0"], ["w1"], ["w2"]]
    part = sub_request(individual, individual.slots[1:])
    assert (part.variables, [s.offset for s in part.slots]) == (("%DW10", "%DW20"), [0, 2])


def test_undeclared_poll_group_is_named() -> None:
    d = device([{"name": "t", "address": "%MW0", "group": "fast"}])
    with pytest.raises(ValueError, match="poll group 'fast' is not declared"):
        plan_device(d)


def test_the_readme_plan_example_is_what_the_planner_prints() -> None:
    readme = (Path(__file__).parents[2] / "drivers" / "xgt" / "README.md").read_text()
    block = readme.split("```text\n", 1)[1].split("```", 1)[0].rstrip("\n")
    d = XgtDevice.model_validate(
        {
            "name": "xgt1",
            "protocol": "xgt",
            "host": "127.0.0.1",
            "interval_s": 0.1,
            "tags": bench_tags(500),
        }
    )
    assert format_plan(d) == block
