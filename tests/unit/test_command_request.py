"""Requests as they arrive: MQTT 5 JSON (every malformed shape refused with its text), and
Sparkplug DCMD payloads built with bindings generated from the published .proto."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from agent.command.request import parse_dcmd, parse_mqtt, parse_ts
from agent.publish import Incoming
from tests.support.sparkplug import generate_bindings


def incoming(payload: bytes, **kw: object) -> Incoming:
    return Incoming("edge-cmd/a1/write", payload, **kw)  # type: ignore[arg-type]


def test_a_request_with_its_properties() -> None:
    req = parse_mqtt(
        incoming(
            b'{"device": "oven", "tag": "sp", "value": 42.5, "ts": "2026-12-01T11:00:00Z"}',
            response_topic="platform/results",
            correlation_data=b"\x01\x02",
            user_properties=(("client_id", "mes-1"), ("user", "anna"), ("signature", "ab")),
        )
    )
    assert req.problem is None
    assert (req.device, req.tag, req.value) == ("oven", "sp", 42.5)
    assert req.response_topic == "platform/results"
    assert req.correlation == b"\x01\x02"
    assert (req.origin.client_id, req.origin.user, req.signature) == ("mes-1", "anna", "ab")
    assert req.sent_at == 1796122800.0


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (
            b"{",
            "the payload is not JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        (
            b"\xff",
            "the payload is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte",
        ),
        (b"[1]", "the payload must be a JSON object with device, tag, value"),
        (b'{"device": "d", "tag": "t"}', "'value' is missing"),
        (b'{"device": "d", "value": 1}', "'tag' is missing"),
        (b'{"device": 1, "tag": "t", "value": 1}', "'device' must be text"),
        (
            b'{"device": "d", "tag": "t", "value": null}',
            "'value' must be a number, true/false or text",
        ),
        (
            b'{"device": "d", "tag": "t", "value": [1]}',
            "'value' must be a number, true/false or text",
        ),
        (
            b'{"device": "d", "tag": "t", "value": 1, "vaule": 2}',
            "unknown key 'vaule' (allowed: device, tag, ts, value)",
        ),
        (
            b'{"device": "d", "tag": "t", "value": 1, "ts": "yesterday"}',
            "'ts' 'yesterday' is not an ISO 8601 time",
        ),
        (
            b'{"device": "d", "tag": "t", "value": 1, "ts": "2026-12-01T11:00:00"}',
            "'ts' '2026-12-01T11:00:00' has no time zone (add Z or +00:00)",
        ),
        (
            b'{"device": "d", "tag": "t", "value": 1, "ts": true}',
            "'ts' must be ISO 8601 text or Unix seconds",
        ),
    ],
)
def test_malformed_requests(payload: bytes, text: str) -> None:
    req = parse_mqtt(incoming(payload))
    assert req.problem is not None
    assert (req.problem.code, req.problem.text) == ("invalid_request", text)


def test_ts_forms() -> None:
    assert parse_ts(1796122800) == 1796122800.0
    assert parse_ts("2026-12-01T12:00:00+01:00") == 1796122800.0
    assert parse_ts(None) is None
    with pytest.raises(ValueError, match="finite"):
        parse_ts(float("nan"))


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return generate_bindings(tmp_path_factory.mktemp("sparkplug_pb"))


def dcmd(pb: ModuleType, *metrics: dict[str, object]) -> bytes:
    payload = pb.Payload()
    payload.timestamp = 1
    for m in metrics:
        metric = payload.metrics.add()
        for key, value in m.items():
            setattr(metric, key, value)
    return bytes(payload.SerializeToString())


TOPIC = "spBv1.0/plant/DCMD/a1/oven"


def test_dcmd_metrics_of_every_type(pb: ModuleType) -> None:
    data = dcmd(
        pb,
        {"name": "sp", "datatype": 9, "float_value": 21.5},
        {"name": "lim", "datatype": 10, "double_value": -1.25},
        {"name": "n16", "datatype": 2, "int_value": (-5) & 0xFFFFFFFF},
        {"name": "n64", "datatype": 4, "long_value": (-7) & 0xFFFFFFFFFFFFFFFF},
        {"name": "u32", "datatype": 7, "int_value": 4_000_000_000},
        {"name": "on", "datatype": 11, "boolean_value": True},
        {"name": "recipe", "datatype": 12, "string_value": "R-7"},
        {"alias": 5, "datatype": 3, "int_value": 12},
    )
    reqs = parse_dcmd(TOPIC, data, lambda d, a: f"{d}-alias{a}" if a == 5 else None)
    assert [(r.device, r.tag, r.value, r.problem) for r in reqs] == [
        ("oven", "sp", 21.5, None),
        ("oven", "lim", -1.25, None),
        ("oven", "n16", -5, None),
        ("oven", "n64", -7, None),
        ("oven", "u32", 4_000_000_000, None),
        ("oven", "on", True, None),
        ("oven", "recipe", "R-7", None),
        ("oven", "oven-alias5", 12, None),
    ]
    assert all(r.origin.channel == "sparkplug" for r in reqs)


def test_dcmd_problems(pb: ModuleType) -> None:
    (bad,) = parse_dcmd(TOPIC, b"\x12\xff", lambda _d, _a: None)
    assert bad.problem is not None
    assert bad.problem.text == "the DCMD payload does not decode: truncated varint"
    unknown, empty = parse_dcmd(
        TOPIC, dcmd(pb, {"alias": 9, "int_value": 1}, {"name": "x"}), lambda _d, _a: None
    )
    assert unknown.problem is not None
    assert unknown.problem.text == "metric alias 9 is not one this node declared"
    assert empty.problem is not None
    assert empty.problem.text == "metric 'x' carries no value"
    (none,) = parse_dcmd(TOPIC, dcmd(pb), lambda _d, _a: None)
    assert none.problem is not None
    assert none.problem.text == "the DCMD has no metrics"


def test_the_ncmd_decoder_still_sees_rebirth(pb: ModuleType) -> None:
    from agent.publish.sparkplug_wire import decode_command

    (m,) = decode_command(dcmd(pb, {"name": "Node Control/Rebirth", "boolean_value": True}))
    assert (m.name, m.value, m.data) == ("Node Control/Rebirth", 1, True)


def test_payload_bytes_are_kept_for_the_signature() -> None:
    raw = json.dumps({"device": "d", "tag": "t", "value": 1}).encode()
    assert parse_mqtt(incoming(raw)).payload == raw
