"""Frame checks of the Modbus driver (`check_frame`) and the planner's split helpers."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.modbus.config import ModbusTag
from drivers.modbus.driver import FRAME_INCOMPLETE, FRAME_OK, check_frame, exception_reason
from drivers.modbus.plan import clusters, plan_requests, sub_request

# Read holding registers 10..13 (tid 5, unit 1): the request every case answers.
REQUEST = bytes.fromhex("0005 0000 0006 01 03 000a 0004")
GOOD = bytes.fromhex("0005 0000 000b 01 03 08 0001 0002 0003 0004")


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (GOOD, FRAME_OK),
        (bytes.fromhex("0005 0000 0003 01 83 02"), FRAME_OK),  # exception response
        (GOOD[:1], FRAME_INCOMPLETE),
        (GOOD[:7], FRAME_INCOMPLETE),
        (GOOD[:-1], FRAME_INCOMPLETE),
        (bytes.fromhex("0006") + GOOD[2:], "protocol error: wrong transaction id"),
        (bytes.fromhex("0006"), "protocol error: wrong transaction id"),
        (GOOD[:2] + bytes.fromhex("0001") + GOOD[4:], "protocol error: wrong protocol id"),
        (GOOD[:4] + bytes.fromhex("0001") + GOOD[6:], "protocol error: bad length"),
        (GOOD[:4] + bytes.fromhex("ffff") + GOOD[6:], "protocol error: bad length"),
        (GOOD[:6] + b"\x02" + GOOD[7:], "protocol error: wrong unit id"),
        (GOOD[:7] + b"\x04" + GOOD[8:], "protocol error: wrong function code"),
        (bytes.fromhex("0005 0000 0003 01 84 02"), "protocol error: wrong function code"),
        (
            bytes.fromhex("0005 0000 0009 01 03 06 0001 0002 0003"),
            "protocol error: wrong byte count",
        ),
        (
            bytes.fromhex("0005 0000 000d 01 03 0a 0001 0002 0003 0004 0005"),
            "protocol error: wrong byte count",
        ),
        (bytes.fromhex("0005 0000 0009 01 03 08 0001 0002 0003"), "protocol error: wrong length"),
        (bytes.fromhex("0005 0000 0004 01 83 02 00"), "protocol error: wrong length"),
        (GOOD + b"\x00", "protocol error: unexpected data"),
    ],
)
def test_check_frame(answer: bytes, verdict: str) -> None:
    assert check_frame(answer, REQUEST) == verdict


def test_check_frame_bits_byte_count() -> None:
    coils = bytes.fromhex("0001 0000 0006 01 01 0000 0009")  # 9 coils → 2 bytes
    assert check_frame(bytes.fromhex("0001 0000 0005 01 01 02 ff 01"), coils) == FRAME_OK
    assert check_frame(bytes.fromhex("0001 0000 0004 01 01 01 ff"), coils) == (
        "protocol error: wrong byte count"
    )


def test_unit_0_accepts_any_unit_id_in_the_answer() -> None:
    request = REQUEST[:6] + b"\x00" + REQUEST[7:]
    assert check_frame(GOOD[:6] + b"\x07" + GOOD[7:], request) == FRAME_OK


def test_exception_reason_is_stable() -> None:
    assert exception_reason(2) == "modbus exception 2 (illegal data address)"
    assert exception_reason(99) == "modbus exception 99 (unknown exception)"


def tag(name: str, address: int, type_: str = "uint16", **extra: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": name, "address": address, "type": type_, **extra})


def test_clusters_keep_multi_register_values_and_shared_registers_together() -> None:
    tags = [
        tag("f", 0, "float32"),
        tag("b0", 2, "bit", bit=0),
        tag("b1", 2, "bit", bit=1),
        tag("u", 3),
        tag("d", 5, "float64"),
        tag("inside", 6),  # overlaps the float64
    ]
    (request,) = plan_requests(tags, max_gap=1)
    assert [[s.tag for s in c] for c in clusters(request)] == [
        ["f"],
        ["b0", "b1"],
        ["u"],
        ["d", "inside"],
    ]


def test_sub_request_spans_its_slots_and_decodes_relative_offsets() -> None:
    tags = [tag("a", 10), tag("b", 12, "int32"), tag("c", 20)]
    (request,) = plan_requests(tags, max_gap=8)
    sub = sub_request(request, request.slots[1:])
    assert (sub.table, sub.start, sub.count) == ("holding", 12, 9)
    assert [(s.tag, s.offset, s.index) for s in sub.slots] == [("b", 0, 1), ("c", 8, 2)]
    words = [0, 7] + [0] * 6 + [9]
    assert sub.decoder.decode(words) == [7, 9]
    with pytest.raises(ValueError, match="at least one slot"):
        sub_request(request, [])
