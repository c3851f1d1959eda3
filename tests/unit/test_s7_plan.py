"""S7 request planning: variables merged per area/DB, packed into PDU-sized requests."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.s7.codec import read_response_size
from drivers.s7.config import S7Device
from drivers.s7.plan import (
    clusters,
    format_plan,
    max_items,
    max_variable_bytes,
    plan_device,
    sub_variable,
)


def dev(tags: list[dict[str, Any]], **kw: Any) -> S7Device:
    return S7Device.model_validate(
        {"name": "p", "protocol": "s7", "host": "10.0.0.1", "tags": tags, **kw}
    )


def t(name: str, address: str, type_: str | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "address": address, **kw}
    if type_:
        out["type"] = type_
    return out


def test_limits_follow_the_pdu() -> None:
    assert [max_variable_bytes(p) for p in (240, 480, 960)] == [222, 462, 942]
    assert [max_items(p, 80) for p in (240, 480, 960)] == [19, 39, 79]
    assert max_items(480, 20) == 20


def test_bits_and_words_of_one_db_share_one_variable() -> None:
    plan = plan_device(
        dev(
            [
                t("a", "DB1.DBX0.0"),
                t("b", "DB1.DBX0.5"),
                t("c", "DB1.DBW2"),
                t("d", "DB1.DBD4", "real"),
            ]
        )
    )
    (request,) = plan.groups["default"].requests
    (var,) = request.variables
    assert (var.area, var.db, var.start, var.count) == ("DB", 1, 0, 8)
    assert [(s.tag, s.offset) for s in var.slots] == [("a", 0), ("b", 0), ("c", 2), ("d", 4)]
    assert len(clusters(var)) == 3  # the two bits of byte 0 stay together


def test_gap_larger_than_max_gap_splits_and_areas_never_merge() -> None:
    plan = plan_device(
        dev(
            [
                t("a", "DB1.DBW0"),
                t("b", "DB1.DBW8"),
                t("c", "DB2.DBW0"),
                t("m", "MW0"),
                t("i", "IW0"),
            ],
            max_gap=4,
        )
    )
    (request,) = plan.groups["default"].requests
    assert [v.where() for v in request.variables] == [
        "DB1.DBB0..1",
        "DB1.DBB8..9",
        "DB2.DBB0..1",
        "MB0..1",
        "IB0..1",
    ]
    merged = plan_device(dev([t("a", "DB1.DBW0"), t("b", "DB1.DBW8")], max_gap=6))
    assert [v.where() for v in merged.groups["default"].requests[0].variables] == ["DB1.DBB0..9"]


def test_long_runs_split_at_tag_boundaries_into_full_variables() -> None:
    tags = [t(f"r{i}", f"DB1.DBD{4 * i}", "real") for i in range(300)]  # 1200 bytes
    plan = plan_device(dev(tags, pdu_size=480))
    variables = [v for r in plan.groups["default"].requests for v in r.variables]
    assert [v.count for v in variables] == [460, 460, 280]
    assert len(plan.groups["default"].requests) == 3  # 466 bytes of items per answer
    for request in plan.groups["default"].requests:
        assert request.answer_size() <= 480
        assert request.request_size() <= 480


def test_many_small_variables_fill_requests_to_the_item_cap() -> None:
    tags = [t(f"w{i}", f"DB{i + 1}.DBW0") for i in range(45)]
    plan = plan_device(dev(tags, pdu_size=960, max_items_per_request=20))
    assert [len(r.variables) for r in plan.groups["default"].requests] == [20, 20, 5]
    plan = plan_device(dev(tags, pdu_size=240, max_items_per_request=80))
    assert [len(r.variables) for r in plan.groups["default"].requests] == [19, 19, 7]


@pytest.mark.parametrize("pdu", [240, 480, 960])
def test_every_request_fits_its_pdu(pdu: int) -> None:
    tags = [
        t(f"s{i}", f"DB{i % 7 + 1}.DBB{(i // 7) * 40}", "string", length=31 + i % 5)
        for i in range(60)
    ]
    tags += [t(f"x{i}", f"M{i * 3}.1") for i in range(40)]
    plan = plan_device(dev(tags, pdu_size=pdu, max_items_per_request=80, max_gap=0))
    requests = plan.groups["default"].requests
    for request in requests:
        assert read_response_size([v.count for v in request.variables]) <= pdu
        assert request.request_size() <= pdu
    seen = sorted(s.index for r in requests for v in r.variables for s in v.slots)
    assert seen == list(range(100))
    data = sum(v.count + 4 for r in requests for v in r.variables)
    assert len(requests) <= data // (pdu - 14) + 2  # close to the lower bound


def test_value_larger_than_one_answer_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="larger than the 222 bytes") as info:
        plan_device(dev([t("s", "DB1.DBB0", "string")], pdu_size=240))
    assert str(info.value) == (
        "tag 's': a string of 256 bytes is larger than the 222 bytes one answer carries "
        "at PDU size 240 (declare a shorter length)"
    )


def test_groups_are_planned_separately() -> None:
    device = dev(
        [t("a", "DB1.DBW0"), t("b", "DB1.DBW2", group="fast")],
        poll_groups={"fast": {"interval_s": 0.1}},
    )
    plan = plan_device(device)
    assert [v.where() for v in plan.groups["default"].requests[0].variables] == ["DB1.DBB0..1"]
    assert [v.where() for v in plan.groups["fast"].requests[0].variables] == ["DB1.DBB2..3"]
    with pytest.raises(ValueError, match="poll group 'slow' is not declared"):
        plan_device(dev([t("a", "MW0", group="slow")]))


def test_sub_variable_keeps_offsets_relative() -> None:
    var = (
        plan_device(dev([t("a", "DB1.DBW0"), t("b", "DB1.DBW4")]))
        .groups["default"]
        .requests[0]
        .variables[0]
    )
    sub = sub_variable(var, [var.slots[1]])
    assert (sub.start, sub.count, sub.slots[0].offset) == (4, 2, 0)


def test_format_plan_text() -> None:
    device = dev(
        [
            t("a", "DB1.DBX0.0"),
            t("b", "DB1.DBW2"),
            t("m", "MW10"),
            t("f", "MD0", "real", group="fast"),
        ],
        poll_groups={"fast": {"interval_s": 0.1}},
        slot=2,
    )
    assert format_plan(device) == (
        "device p (s7 10.0.0.1:102 TSAP 01.00/01.02, PDU 480, 4 tags)\n"
        "  group default every 1 s: 3 tags, 2 variables, 1 request per poll\n"
        "    read 2 variables, answer 28 bytes: DB1.DBB0..3, MB10..11\n"
        "  group fast every 0.1 s: 1 tag, 1 variable, 1 request per poll\n"
        "    read 1 variable, answer 22 bytes: MB0..3\n"
        "  total: 11 requests/s"
    )


_TYPES = {"bool": "X", "byte": "B", "int": "W", "real": "D", "lreal": "B", "string": "B"}


@st.composite
def tag_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 120))
    out: list[dict[str, Any]] = []
    for i in range(n):
        typ = draw(st.sampled_from(sorted(_TYPES)))
        area = draw(st.sampled_from(["DB1.DB", "DB2.DB", "M", "I", "Q"]))
        byte = draw(st.integers(0, 3000))
        letter = _TYPES[typ]
        addr = f"{area}{letter}{byte}" + (f".{draw(st.integers(0, 7))}" if letter == "X" else "")
        if area in ("M", "I", "Q") and letter == "X":
            addr = f"{area}{byte}.{addr.rsplit('.', 1)[1]}"
        tag: dict[str, Any] = {"name": f"t{i}", "address": addr, "type": typ}
        if typ == "string":
            tag["length"] = draw(st.integers(1, 200))
        out.append(tag)
    return out


@settings(max_examples=150, deadline=None)
@given(
    tag_lists(),
    st.sampled_from([240, 480, 960]),
    st.integers(1, 40),
    st.integers(0, 16),
)
def test_any_config_plans_into_requests_that_fit(
    tags: list[dict[str, Any]], pdu: int, cap: int, gap: int
) -> None:
    device = dev(tags, pdu_size=pdu, max_items_per_request=cap, max_gap=gap)
    requests = plan_device(device).groups["default"].requests
    seen: list[int] = []
    for request in requests:
        assert 1 <= len(request.variables) <= cap
        assert request.request_size() <= pdu
        assert request.answer_size() <= pdu
        for var in request.variables:
            assert var.count <= max_variable_bytes(pdu)
            for slot in var.slots:
                assert slot.offset >= 0
                assert slot.offset + slot.spec.size <= var.count
                tag = device.tags[slot.index]
                addr = tag.resolved_address()
                assert (addr.area, addr.db, addr.byte) == (
                    var.area,
                    var.db,
                    var.start + slot.offset,
                )
                seen.append(slot.index)
    assert sorted(seen) == list(range(len(tags)))
