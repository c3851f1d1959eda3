"""`edge-agent watch` lines: what an integrator reads while commissioning."""

from __future__ import annotations

import orjson

from agent.publish.watch import format_message


def test_batch_lines_show_value_unit_quality_and_reason() -> None:
    payload = orjson.dumps(
        {
            "schema": "edge-agent/batch/1",
            "device": "oven",
            "samples": [
                {"device": "oven", "tag": "temp", "value": 204.3333, "unit": "degC",
                 "quality": "good", "reason": None, "seq": 7},
                {"device": "oven", "tag": "recipe", "value": None, "unit": None,
                 "quality": "bad", "reason": "modbus exception 2 (illegal data address)",
                 "seq": 8},
            ],
        }
    )  # fmt: skip
    assert format_message("edge/gw/oven", payload) == [
        "seq       7  oven/temp = 204.3 degC  [good]",
        "seq       8  oven/recipe = None  [bad (modbus exception 2 (illegal data address))]",
    ]


def test_per_tag_message_and_non_json() -> None:
    one = orjson.dumps({"device": "d", "tag": "t", "value": True, "quality": "good", "seq": 1})
    assert format_message("edge/gw/d/t", one) == ["seq       1  d/t = True  [good]"]
    assert format_message("spBv1.0/g/NDATA/n", b"\x08\x01") == [
        "spBv1.0/g/NDATA/n  <2 bytes, not JSON>"
    ]
