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


def test_every_layout_shows_the_same_lines_and_compact_waits_for_its_metadata() -> None:
    from agent.buffer import Record
    from agent.config import AgentSection, MqttConfig
    from agent.layouts.decode import Decoder
    from agent.payload import PayloadEncoder

    samples = [
        {"device": "oven", "tag": "temp", "value": 204.3333, "quality": "good", "reason": None,
         "code": None, "ts_source": None, "ts_agent": "2026-12-01T08:00:00Z", "unit": "degC",
         "seq": 7},
        {"device": "oven", "tag": "recipe", "value": None, "quality": "bad",
         "reason": "timeout", "code": None, "ts_source": None,
         "ts_agent": "2026-12-01T08:00:00Z", "unit": None, "seq": 8},
    ]  # fmt: skip
    record = Record(1, "oven", 7, 8, 2, 0.0, orjson.dumps(samples))
    expected = [
        "seq       7  oven/temp = 204.3 degC  [good]",
        "seq       8  oven/recipe = None  [bad (timeout)]",
    ]
    for layout in ("lean", "compact", "device", "tag"):
        enc = PayloadEncoder(AgentSection(id="gw"), MqttConfig(layout=layout))
        pre, data = enc.preamble(record), enc.encode(record)
        if layout == "compact":
            [meta] = pre
            assert format_message("edge/gw/oven", data[0].payload) == [
                f"edge/gw/oven  compact data of oven: waiting for its metadata "
                f"{orjson.loads(meta.payload)['meta']}"
            ]
        decoder = Decoder()
        lines = [line for m in pre + data for line in format_message(m.topic, m.payload, decoder)]
        if layout == "compact":
            assert lines[0].endswith(": 2 tags")
            lines = lines[1:]
        assert lines == expected, layout
