"""Modbus request planner: merges, gaps, caps, groups, tables, classic addresses."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.modbus.config import ModbusDevice, ModbusTag
from drivers.modbus.plan import format_plan, plan_device, plan_requests


def device(tags: list[dict[str, Any]], **extra: Any) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {"name": "plc", "protocol": "modbus", "host": "127.0.0.1", "tags": tags, **extra}
    )


def tag(name: str, address: int | str, type_: str = "uint16", **extra: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": name, "address": address, "type": type_, **extra})


def spans(requests: Any) -> list[tuple[str, int, int]]:
    return [(r.table, r.start, r.count) for r in requests]


def test_contiguous_tags_merge_into_one_request() -> None:
    tags = [tag("a", 0), tag("b", 1, "float32"), tag("c", 3, "int64")]
    requests = plan_requests(tags)
    assert spans(requests) == [("holding", 0, 7)]
    assert [(s.tag, s.offset) for s in requests[0].slots] == [("a", 0), ("b", 1), ("c", 3)]


def test_gap_merges_only_within_max_gap() -> None:
    tags = [tag("a", 0), tag("b", 4), tag("c", 10)]
    assert spans(plan_requests(tags, max_gap=0)) == [
        ("holding", 0, 1),
        ("holding", 4, 1),
        ("holding", 10, 1),
    ]
    # gap a→b is 3 unused registers, b→c is 5
    assert spans(plan_requests(tags, max_gap=3)) == [("holding", 0, 5), ("holding", 10, 1)]
    assert spans(plan_requests(tags, max_gap=5)) == [("holding", 0, 11)]


def test_200_consecutive_registers_need_exactly_two_requests() -> None:
    tags = [tag(f"r{i}", i) for i in range(200)]
    requests = plan_requests(tags)
    assert spans(requests) == [("holding", 0, 125), ("holding", 125, 75)]
    assert sum(len(r.slots) for r in requests) == 200


def test_float32_never_split_at_the_boundary() -> None:
    # 124 uint16 at 0..123, then a float32 at 124..125: it does not fit in 0..124
    tags = [*(tag(f"r{i}", i) for i in range(124)), tag("f", 124, "float32")]
    requests = plan_requests(tags)
    assert spans(requests) == [("holding", 0, 124), ("holding", 124, 2)]
    assert requests[1].slots[0].tag == "f"


def test_per_device_max_registers() -> None:
    dev = device([{"name": f"r{i}", "address": i} for i in range(10)], max_registers_per_request=4)
    requests = plan_device(dev).groups["default"].requests
    assert spans(requests) == [("holding", 0, 4), ("holding", 4, 4), ("holding", 8, 2)]


def test_value_larger_than_the_cap_is_a_config_error() -> None:
    dev = device([{"name": "big", "address": 0, "type": "float64"}], max_registers_per_request=2)
    with pytest.raises(
        ValueError, match=r"tag 'big': a float64 of 4 registers is larger than the 2"
    ):
        plan_device(dev)


def test_bits_and_registers_are_separate_with_their_own_caps() -> None:
    tags = [
        *(tag(f"c{i}", i, "bool", table="coil") for i in range(2500)),
        tag("h", 0),
        tag("d", 0, "bool", table="discrete_input"),
        tag("i", 0, "int16", table="input"),
    ]
    requests = plan_requests(tags)
    assert spans(requests) == [
        ("coil", 0, 2000),
        ("coil", 2000, 500),
        ("discrete_input", 0, 1),
        ("holding", 0, 1),
        ("input", 0, 1),
    ]
    assert [r.function_code for r in requests] == [1, 1, 2, 3, 4]
    assert spans(plan_requests(tags[:10], max_bits=4)) == [
        ("coil", 0, 4),
        ("coil", 4, 4),
        ("coil", 8, 2),
    ]


def test_overlapping_tags_share_a_request() -> None:
    tags = [tag(f"b{n}", 7, "bit", bit=n) for n in range(16)] + [tag("word", 7)]
    requests = plan_requests(tags)
    assert spans(requests) == [("holding", 7, 1)]
    assert len(requests[0].slots) == 17
    assert {s.offset for s in requests[0].slots} == {0}


def test_slots_keep_config_order_indexes() -> None:
    tags = [tag("late", 50), tag("early", 0), tag("coil", 0, "bool")]
    requests = plan_requests(tags, max_gap=100)
    by_tag = {s.tag: s.index for r in requests for s in r.slots}
    assert by_tag == {"late": 0, "early": 1, "coil": 2}


def test_groups_are_planned_separately() -> None:
    dev = device(
        [
            {"name": "fast1", "address": 0},
            {"name": "slow", "address": 1, "group": "slow"},
            {"name": "fast2", "address": 2},
        ],
        poll_groups={"slow": {"interval_s": 10.0}},
    )
    plan = plan_device(dev)
    assert spans(plan.groups["default"].requests) == [("holding", 0, 1), ("holding", 2, 1)]
    assert spans(plan.groups["slow"].requests) == [("holding", 1, 1)]
    assert plan.groups["default"].tags == ("fast1", "fast2")
    assert plan.groups["slow"].interval_s == 10.0


def test_undeclared_group_is_a_config_error() -> None:
    dev = device([{"name": "t", "address": 0, "group": "nope"}])
    with pytest.raises(ValueError, match="tag 't': poll group 'nope' is not declared"):
        plan_device(dev)


def test_classic_addresses() -> None:
    tags = [tag("h", "40001"), tag("h2", "400002"), tag("i", "30010"), tag("c", "00001", "bool")]
    requests = plan_requests(tags)
    assert spans(requests) == [("coil", 0, 1), ("holding", 0, 2), ("input", 9, 1)]


def test_device_byte_order_applies_unless_tag_overrides() -> None:
    dev = device(
        [
            {"name": "a", "address": 0, "type": "float32"},
            {"name": "b", "address": 2, "type": "float32", "byte_order": "BADC"},
        ],
        byte_order="CDAB",
    )
    slots = plan_device(dev).groups["default"].requests[0].slots
    assert [s.spec.byte_order for s in slots] == ["CDAB", "BADC"]


def test_format_plan() -> None:
    dev = device(
        [
            *({"name": f"r{i}", "address": i} for i in range(126)),
            {"name": "c", "address": 3, "type": "bool", "group": "slow"},
        ],
        poll_groups={"slow": {"interval_s": 5.0}},
    )
    text = format_plan(dev)
    assert text.splitlines() == [
        "device plc (modbus 127.0.0.1:502 unit 1, 127 tags)",
        "  group default every 1 s: 126 tags, 2 requests per poll",
        "    holding 0..124 (125 registers, 125 tags)",
        "    holding 125..125 (1 register, 1 tag)",
        "  group slow every 5 s: 1 tag, 1 request per poll",
        "    coil 3..3 (1 bit, 1 tag)",
        "  total: 2.2 requests/s",
    ]
