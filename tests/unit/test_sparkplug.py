"""Sparkplug B encoder and edge-node state, decoded independently.

Every payload is decoded with protobuf bindings generated at test time (grpcio-tools'
protoc) from the published Eclipse Tahu ``sparkplug_b.proto`` in tests/fixtures, never
with the agent's own code.
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer import Record
from agent.config import AgentSection, ConfigError, MqttConfig, SparkplugConfig, parse_config
from agent.payload import PayloadEncoder
from agent.publish import Message
from agent.publish.sparkplug import (
    BOOLEAN,
    DOUBLE,
    EPOCH_METRIC,
    INT64,
    STRING,
    UINT64,
    BdSeqStore,
    SparkplugNode,
    decode_command,
)
from agent.publish.sparkplug_wire import timestamp_ms
from tests.support.sparkplug import generate_bindings


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return generate_bindings(tmp_path_factory.mktemp("sparkplug_pb"))


def decode(pb: ModuleType, payload: bytes) -> Any:
    msg = pb.Payload()
    msg.ParseFromString(payload)
    return msg


AGENT = AgentSection(id="gw-1")
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def mqtt(**sparkplug: Any) -> MqttConfig:
    return MqttConfig(layout="sparkplug", sparkplug=SparkplugConfig(group_id="plant", **sparkplug))


def sample(
    tag: str,
    value: Any,
    quality: str = "good",
    *,
    seq: int = 1,
    ts_source: datetime | None = None,
    ts_agent: datetime = T0,
    reason: str | None = None,
    unit: str | None = None,
) -> dict[str, Any]:
    return {
        "device": "press",
        "tag": tag,
        "value": value,
        "quality": quality,
        "reason": reason,
        "code": None,
        "ts_source": ts_source,
        "ts_agent": ts_agent,
        "unit": unit,
        "seq": seq,
    }


def record(samples: list[dict[str, Any]], device: str = "press", rid: int = 1) -> Record:
    for s in samples:
        s["device"] = device
    return Record(
        id=rid,
        device=device,
        first_seq=samples[0]["seq"],
        last_seq=samples[-1]["seq"],
        count=len(samples),
        created=0.0,
        data=orjson.dumps(samples),
    )


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def metric_value(m: Any) -> Any:
    which = m.WhichOneof("value")
    return None if which is None else getattr(m, which)


def properties(m: Any) -> dict[str, Any]:
    return {
        k: (v.int_value if v.HasField("int_value") else v.string_value)
        for k, v in zip(m.properties.keys, m.properties.values, strict=True)
    }


def connected_node(**settings: Any) -> tuple[SparkplugNode, list[Message]]:
    """A node after its first connect: the will made, NBIRTH stamped (seq 0)."""
    node = SparkplugNode(AGENT, mqtt(**settings))
    will = node.next_will()
    births = [node.stamp(m) for m in node.on_connect()]
    return node, [will, *births]


# ---------------------------------------------------------------------- node lifecycle


def test_nbirth_and_ndeath_carry_the_same_bdseq(pb: ModuleType) -> None:
    node, (will, nbirth) = connected_node()
    assert will.topic == "spBv1.0/plant/NDEATH/gw-1"
    assert (will.qos, will.retain) == (1, False)
    death = decode(pb, will.payload)
    assert not death.HasField("seq")
    assert [(m.name, m.datatype, m.long_value) for m in death.metrics] == [("bdSeq", INT64, 0)]

    assert nbirth.topic == "spBv1.0/plant/NBIRTH/gw-1"
    birth = decode(pb, nbirth.payload)
    assert birth.seq == 0
    assert birth.timestamp > 0
    by_name = {m.name: m for m in birth.metrics}
    assert by_name["bdSeq"].long_value == 0
    assert by_name["bdSeq"].datatype == INT64
    rebirth = by_name["Node Control/Rebirth"]
    assert (rebirth.datatype, rebirth.boolean_value) == (BOOLEAN, False)

    # The next connection attempt takes the next bdSeq, and its NBIRTH carries it too.
    will2 = node.next_will()
    nbirth2 = node.stamp(node.on_connect()[0])
    assert decode(pb, will2.payload).metrics[0].long_value == 1
    assert {m.name: m.long_value for m in decode(pb, nbirth2.payload).metrics}["bdSeq"] == 1
    assert decode(pb, node.clean_death().payload).metrics[0].long_value == 1


def test_bdseq_persists_across_restarts_and_wraps(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db.sparkplug-bdseq"
    store = BdSeqStore(path)
    assert store.last is None
    assert [store.next() for _ in range(3)] == [0, 1, 2]
    assert BdSeqStore(path).next() == 3  # a restart continues after the last one used
    path.write_text("255\n")
    assert BdSeqStore(path).next() == 0
    path.write_text("garbage")
    assert BdSeqStore(path).next() == 0


def test_bdseq_file_unwritable_keeps_counting_in_memory(tmp_path: Path) -> None:
    store = BdSeqStore(tmp_path / "missing-dir" / "bdseq")
    assert [store.next(), store.next()] == [0, 1]


def test_seq_follows_wire_order_wraps_and_resets_on_nbirth(pb: ModuleType) -> None:
    node, _ = connected_node()
    rec = record([sample("a", 1)])
    seqs = []
    for _ in range(300):
        for msg in node.encode(rec):
            seqs.append(decode(pb, node.stamp(msg).payload).seq)
    assert seqs[:3] == [1, 2, 3]  # NBIRTH had 0
    assert max(seqs) == 255
    assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(seqs))
    # NDEATH carries no seq and does not consume one.
    death = node.stamp(node.clean_death())
    assert not decode(pb, death.payload).HasField("seq")
    node.request_rebirth()
    rebirth = [node.stamp(m) for m in node.pending()]
    assert [decode(pb, m.payload).seq for m in rebirth] == [0, 1]


# ---------------------------------------------------------------------- data


def test_first_record_births_the_device_then_data_by_alias(pb: ModuleType) -> None:
    node, _ = connected_node()
    src = T0 - timedelta(seconds=5)
    rec = record(
        [
            sample("running", True, seq=1),
            sample("count", -1234567890123, seq=2, ts_source=src),
            sample("big", 18000000000000000000, seq=3),
            sample("power", 21.5, seq=4, unit="kW"),
            sample("recipe", "PA66-GF", seq=5),
            sample("curve", [1, 2.5, 3], seq=6),
            sample("struct", {"a": 1, "b": "x"}, seq=7),
            sample("temp", 3, "uncertain", seq=8, reason="sensor drift"),
        ]
    )
    dbirth, ddata = node.encode(rec)
    assert dbirth.topic == "spBv1.0/plant/DBIRTH/gw-1/press"
    assert ddata.topic == "spBv1.0/plant/DDATA/gw-1/press"
    assert dbirth.qos == ddata.qos == 1
    birth = decode(pb, dbirth.payload)
    defs = {m.name: m for m in birth.metrics}
    assert {n: m.datatype for n, m in defs.items()} == {
        "running": BOOLEAN,
        "count": INT64,
        "big": UINT64,
        "power": DOUBLE,
        "recipe": STRING,
        "curve": STRING,
        "struct": STRING,
        "temp": INT64,
    }
    aliases = {m.alias for m in birth.metrics}
    assert len(aliases) == 8
    assert 1 not in aliases  # 1 is Node Control/Rebirth
    # The birth carries the record's values (current at the time), as data does.
    assert defs["power"].double_value == 21.5
    assert defs["recipe"].string_value == "PA66-GF"
    assert properties(defs["temp"]) == {"Quality": 64, "Reason": "sensor drift"}
    assert properties(defs["power"]) == {"Quality": 192, "engUnit": "kW"}
    assert not any(m.is_null for m in birth.metrics)

    data = decode(pb, ddata.payload)
    by_alias = {m.alias: m for m in data.metrics}
    assert set(by_alias) == aliases
    assert all(not m.name for m in data.metrics)
    got = {n: by_alias[m.alias] for n, m in defs.items()}
    assert got["running"].boolean_value is True
    # Int64 travels as its two's complement in the uint64 long_value.
    assert got["count"].long_value - (1 << 64) == -1234567890123
    assert got["big"].long_value == 18000000000000000000
    assert got["power"].double_value == 21.5
    assert got["recipe"].string_value == "PA66-GF"
    assert orjson.loads(got["curve"].string_value) == [1, 2.5, 3]
    assert orjson.loads(got["struct"].string_value) == {"a": 1, "b": "x"}
    assert got["count"].timestamp == ms(src)  # the device's timestamp wins
    assert got["power"].timestamp == ms(T0)
    assert properties(got["power"]) == {"Quality": 192}
    assert properties(got["temp"]) == {"Quality": 64, "Reason": "sensor drift"}
    assert not any(m.is_historical for m in data.metrics)

    # Born now: the next record is DDATA only, and the next birth carries current values.
    (again,) = node.encode(record([sample("power", 22.0, seq=9, unit="kW")], rid=2))
    assert again.topic.endswith("/DDATA/gw-1/press")
    node.request_rebirth()
    _nbirth, dbirth2 = node.pending()
    defs2 = {m.name: m for m in decode(pb, dbirth2.payload).metrics}
    assert defs2["power"].double_value == 22.0
    assert properties(defs2["power"]) == {"Quality": 192, "engUnit": "kW"}
    assert defs2["recipe"].string_value == "PA66-GF"
    assert {m.alias for m in defs2.values()} == aliases  # aliases are stable


def test_historical_records_are_marked_on_every_metric(pb: ModuleType) -> None:
    node, _ = connected_node()
    _birth, ddata = node.encode(record([sample("a", 1), sample("b", 2.0)]), historical=True)
    data = decode(pb, ddata.payload)
    assert [m.is_historical for m in data.metrics] == [True, True]


def test_backlog_drop_setting_drops_historical_only() -> None:
    node, _ = connected_node(backlog="drop")
    assert node.encode(record([sample("a", 1)]), historical=True) == []
    assert node.stats.records_dropped_backlog == 1
    assert len(node.encode(record([sample("a", 1)]))) == 2


def test_qos_zero_setting_is_spec_strict() -> None:
    node, msgs = connected_node(qos=0)
    will, nbirth = msgs
    assert will.qos == 1  # the specification wants the will at QoS 1
    assert nbirth.qos == 0
    assert {m.qos for m in node.encode(record([sample("a", 1)]))} == {0}


def test_datatype_change_rebirths_the_device(pb: ModuleType) -> None:
    node, _ = connected_node()
    node.encode(record([sample("x", 3)]))
    # An int metric may carry floats only after a birth that says Double.
    dbirth, ddata = node.encode(record([sample("x", 3.5)], rid=2))
    assert {m.name: m.datatype for m in decode(pb, dbirth.payload).metrics} == {"x": DOUBLE}
    assert decode(pb, ddata.payload).metrics[0].double_value == 3.5
    # A Double metric takes ints without a new birth.
    (ddata2,) = node.encode(record([sample("x", 4)], rid=3))
    assert decode(pb, ddata2.payload).metrics[0].double_value == 4.0


def test_null_values(pb: ModuleType) -> None:
    node, _ = connected_node()
    # A tag bad from the start is declared too: is_null, placeholder datatype String.
    dbirth, ddata = node.encode(
        record([sample("a", 1), sample("b", None, "bad", reason="timeout")])
    )
    defs = {m.name: m for m in decode(pb, dbirth.payload).metrics}
    assert list(defs) == ["a", "b"]
    assert defs["b"].is_null
    assert defs["b"].datatype == STRING
    assert properties(defs["b"]) == {"Quality": 0, "Reason": "timeout"}
    data = decode(pb, ddata.payload).metrics
    assert [m.is_null for m in data] == [False, True]
    (ddata2,) = node.encode(record([sample("a", None, "bad", reason="timeout")], rid=2))
    (m,) = decode(pb, ddata2.payload).metrics
    assert m.is_null
    assert metric_value(m) is None
    assert not m.HasField("datatype")  # only births say it
    assert properties(m) == {"Quality": 0, "Reason": "timeout"}
    # Its first value brings a birth with the real datatype.
    dbirth3, _ = node.encode(record([sample("b", 2.5)], rid=3))
    defs3 = {m.name: m for m in decode(pb, dbirth3.payload).metrics}
    assert (defs3["b"].datatype, defs3["b"].double_value) == (DOUBLE, 2.5)
    assert defs3["b"].alias == defs["b"].alias


def test_device_death_and_rebirth(pb: ModuleType) -> None:
    node, _ = connected_node()
    node.encode(record([sample("a", 1)]))
    node.device_state("press", "down")
    (ddeath,) = node.pending()
    assert ddeath.topic == "spBv1.0/plant/DDEATH/gw-1/press"
    assert decode(pb, node.stamp(ddeath).payload).HasField("seq")
    node.device_state("press", "down")  # no second DDEATH
    assert node.pending() == []
    # While dead, its all-bad polls are not published (the DDEATH said it).
    assert node.encode(record([sample("a", None, "bad", reason="unreachable")], rid=2)) == []
    assert node.stats.records_skipped_dead == 1
    # Backlog with real values from before the death: birth, data, death again.
    out = node.encode(record([sample("a", 5)], rid=3), historical=True)
    assert [m.topic.split("/")[2] for m in out] == ["DBIRTH", "DDATA", "DDEATH"]
    node.device_state("press", "up")
    (dbirth,) = node.pending()
    assert dbirth.topic == "spBv1.0/plant/DBIRTH/gw-1/press"
    assert decode(pb, dbirth.payload).metrics[0].long_value == 5


def test_connect_unbirths_every_device(pb: ModuleType) -> None:
    node, _ = connected_node()
    node.encode(record([sample("a", 1)], device="d1"))
    node.encode(record([sample("b", 2)], device="d2"))
    node.device_state("d2", "down")
    node.next_will()
    (nbirth,) = node.on_connect()
    assert nbirth.topic.endswith("/NBIRTH/gw-1")
    # No DDEATH left over from the old session; only the live device is born again.
    assert [m.topic for m in node.pending()] == ["spBv1.0/plant/DBIRTH/gw-1/d1"]


# ---------------------------------------------------------------------- NCMD


def ncmd(pb: ModuleType, *, name: str | None, alias: int | None, value: bool) -> bytes:
    payload = pb.Payload()
    payload.timestamp = ms(T0)
    m = payload.metrics.add()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    m.datatype = BOOLEAN
    m.boolean_value = value
    data: bytes = payload.SerializeToString()
    return data


def test_ncmd_rebirth_by_name_or_alias(pb: ModuleType) -> None:
    node, (will, _) = connected_node()
    node.encode(record([sample("a", 1)]))
    node.on_command(node.ncmd_topic, ncmd(pb, name="Node Control/Rebirth", alias=None, value=True))
    nbirth, dbirth = [node.stamp(m) for m in node.pending()]
    birth = decode(pb, nbirth.payload)
    assert birth.seq == 0
    # A rebirth keeps the bdSeq of the connection (the will is unchanged).
    assert {m.name: m.long_value for m in birth.metrics}["bdSeq"] == 0
    assert decode(pb, will.payload).metrics[0].long_value == 0
    assert dbirth.topic.endswith("/DBIRTH/gw-1/press")
    assert decode(pb, dbirth.payload).seq == 1

    node.on_command(node.ncmd_topic, ncmd(pb, name=None, alias=1, value=True))
    assert len(node.pending()) == 2
    node.on_command(node.ncmd_topic, ncmd(pb, name="Node Control/Rebirth", alias=None, value=False))
    assert node.pending() == []
    node.on_command(node.ncmd_topic, b"\xff\xff")
    assert node.stats.bad_commands == 1
    assert node.stats.rebirth_requests == 2


def test_decode_command_reads_what_protoc_writes(pb: ModuleType) -> None:
    (m,) = decode_command(ncmd(pb, name="Node Control/Rebirth", alias=7, value=True))
    assert (m.name, m.alias, m.value) == ("Node Control/Rebirth", 7, 1)
    with pytest.raises(ValueError, match="truncated"):
        decode_command(b"\x12\x05ab")


# ---------------------------------------------------------------------- config, encoder


def test_payload_encoder_selects_sparkplug(pb: ModuleType) -> None:
    encoder = PayloadEncoder(AGENT, mqtt(edge_node_id="line4"))
    assert encoder.sparkplug is not None
    msgs = encoder.encode(record([sample("a", 1)]))
    assert [m.topic for m in msgs] == [
        "spBv1.0/plant/DBIRTH/line4/press",
        "spBv1.0/plant/DDATA/line4/press",
    ]


def test_config_needs_the_sparkplug_section() -> None:
    text = """\
agent: {id: gw}
mqtt: {layout: sparkplug}
devices:
  - {name: d, protocol: modbus, host: 127.0.0.1, tags: [{name: t, address: 0}]}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "x.yaml")
    assert any("layout sparkplug needs a sparkplug section" in p for p in err.value.problems)
    bad = text.replace("{layout: sparkplug}", "{layout: sparkplug, sparkplug: {group_id: a/b}}")
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "x.yaml")
    assert any("group_id" in p for p in err.value.problems)
    good = text.replace("{layout: sparkplug}", "{layout: sparkplug, sparkplug: {group_id: g}}")
    config = parse_config(good, "x.yaml")
    assert config.mqtt.sparkplug is not None
    assert (config.mqtt.sparkplug.qos, config.mqtt.sparkplug.backlog) == (1, "send")


# ---------------------------------------------------------------------- complete births


def test_first_dbirth_after_connect_carries_latest_values(pb: ModuleType) -> None:
    """A restarted agent: the node has encoded nothing yet, the runtime's newest samples
    are known. The first DBIRTH carries every metric's value, timestamp and quality."""
    src = T0 - timedelta(seconds=3)
    latest = {
        "press": {
            "power": sample("power", 21.5, unit="kW", ts_source=src),
            "count": sample("count", 7, "uncertain", reason="sensor drift"),
            "dead": sample("dead", None, "bad", reason="BadNodeIdUnknown"),
        }
    }
    node = SparkplugNode(AGENT, mqtt(), latest=lambda d: latest.get(d, {}))
    node.next_will()
    node.on_connect()
    node.device_state("press", "up")
    (dbirth,) = node.pending()
    defs = {m.name: m for m in decode(pb, dbirth.payload).metrics}
    assert defs["power"].double_value == 21.5
    assert defs["power"].timestamp == ms(src)
    assert properties(defs["power"]) == {"Quality": 192, "engUnit": "kW"}
    assert (defs["count"].datatype, defs["count"].long_value) == (INT64, 7)
    assert defs["count"].timestamp == ms(T0)
    assert properties(defs["count"]) == {"Quality": 64, "Reason": "sensor drift"}
    assert defs["dead"].is_null
    assert properties(defs["dead"]) == {"Quality": 0, "Reason": "BadNodeIdUnknown"}
    assert not any(m.is_null for n, m in defs.items() if n != "dead")
    # The data that follows uses the aliases the birth gave, without datatypes.
    (ddata,) = node.encode(record([sample("power", 22.0), sample("dead", None, "bad")]))
    data = decode(pb, ddata.payload)
    assert [m.alias for m in data.metrics] == [defs["power"].alias, defs["dead"].alias]
    assert not any(m.HasField("datatype") for m in data.metrics)


def test_birth_prefers_latest_over_backlog(pb: ModuleType) -> None:
    latest = {"press": {"a": sample("a", 99, seq=50)}}
    node = SparkplugNode(AGENT, mqtt(), latest=lambda d: latest[d])
    node.next_will()
    node.on_connect()
    dbirth, ddata = node.encode(record([sample("a", 1, seq=1)]), historical=True)
    assert decode(pb, dbirth.payload).metrics[0].long_value == 99  # the current value
    assert decode(pb, ddata.payload).metrics[0].long_value == 1  # the backlog's own
    # A newer value of a wider type in `latest` widens the birth's datatype.
    latest["press"]["a"] = sample("a", 2.5)
    node.request_rebirth()
    _nbirth, dbirth2 = node.pending()
    (m,) = decode(pb, dbirth2.payload).metrics
    assert (m.datatype, m.double_value) == (DOUBLE, 2.5)


def test_latest_that_raises_falls_back_to_the_nodes_own_samples(pb: ModuleType) -> None:
    def broken(device: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    node = SparkplugNode(AGENT, mqtt(), latest=broken)
    dbirth, _ = node.encode(record([sample("a", 4)]))
    assert decode(pb, dbirth.payload).metrics[0].long_value == 4
    assert node.stats.latest_failed == 1
    # Garbage instead of samples: ignored the same way, the birth still goes out.
    garbage: Any = {"a": 17, "b": None}
    for returned in (garbage, ["not", "a", "mapping"]):

        def odd(device: str, r: Any = returned) -> Any:
            return r

        node = SparkplugNode(AGENT, mqtt(), latest=odd)
        dbirth, _ = node.encode(record([sample("a", 4)]))
        assert [(m.name, m.long_value) for m in decode(pb, dbirth.payload).metrics] == [("a", 4)]


def test_nbirth_carries_the_buffer_epoch(pb: ModuleType) -> None:
    epochs = iter(["3f2a", "77b1"])
    node = SparkplugNode(AGENT, mqtt(), epoch=lambda: next(epochs))
    node.next_will()
    (nbirth,) = node.on_connect()
    by_name = {m.name: m for m in decode(pb, nbirth.payload).metrics}
    assert (by_name[EPOCH_METRIC].datatype, by_name[EPOCH_METRIC].string_value) == (
        STRING,
        "3f2a",
    )
    # Read at every NBIRTH: a buffer that made a new epoch is announced by the next one.
    node.request_rebirth()
    nbirth2 = node.pending()[0]
    assert {m.name: m.string_value for m in decode(pb, nbirth2.payload).metrics}[
        EPOCH_METRIC
    ] == "77b1"
    # An epoch that cannot be read leaves the metric out; the birth still goes out.
    node.request_rebirth()
    nbirth3 = node.pending()[0]
    assert EPOCH_METRIC not in {m.name for m in decode(pb, nbirth3.payload).metrics}


# ---------------------------------------------------------------------- values, timestamps


def stored(s: dict[str, Any]) -> dict[str, Any]:
    """A sample as the buffer keeps a non-finite float (docs/mqtt.md): value null, bad,
    the reason, the text in value_text."""
    v = s["value"]
    if isinstance(v, float) and not math.isfinite(v):
        text = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        reason = "not a number" if math.isnan(v) else "infinite"
        return {**s, "value": None, "quality": "bad", "reason": reason, "value_text": text}
    return s


def test_nan_and_infinity_go_out_as_the_float(pb: ModuleType) -> None:
    raw = [
        sample("nan", math.nan, seq=1),
        sample("inf", math.inf, seq=2),
        sample("ninf", -math.inf, seq=3),
    ]
    # From the runtime's newest samples (the floats themselves) into the birth ...
    node = SparkplugNode(AGENT, mqtt(), latest=lambda d: {s["tag"]: s for s in raw})
    node.next_will()
    node.on_connect()
    # ... and from the buffer, where they are null with their text in value_text.
    text = [stored(s) for s in raw]
    nan2 = stored(sample("nan2", math.nan, seq=4))
    dbirth, ddata = node.encode(record([*text, nan2]))
    defs = {m.name: m for m in decode(pb, dbirth.payload).metrics}
    assert {n: m.datatype for n, m in defs.items()} == dict.fromkeys(defs, DOUBLE)
    assert math.isnan(defs["nan"].double_value)
    assert defs["inf"].double_value == math.inf
    by_alias = {m.alias: m for m in decode(pb, ddata.payload).metrics}
    got = {n: by_alias[m.alias].double_value for n, m in defs.items()}
    assert math.isnan(got["nan"])
    assert math.isnan(got["nan2"])
    assert got["inf"] == math.inf
    assert got["ninf"] == -math.inf
    assert not any(m.is_null for m in by_alias.values())
    assert properties(by_alias[defs["nan"].alias]) == {"Quality": 0, "Reason": "not a number"}


def test_timestamps_out_of_range_never_make_the_encoder_raise(pb: ModuleType) -> None:
    node, _ = connected_node()
    rec = record(
        [
            sample("a", 1, seq=1, ts_source=datetime(1601, 1, 1, tzinfo=UTC)),
            sample("b", 2, seq=2, ts_source=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
            sample("c", 3, seq=3, ts_source=datetime(2024, 5, 1, 12, 0, 1)),  # naive: UTC
        ]
    )
    _dbirth, ddata = node.encode(rec)
    got = [m.timestamp for m in decode(pb, ddata.payload).metrics]
    assert got[0] == ms(T0)  # before 1970: the agent's timestamp instead
    assert got[1] == ms(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert got[2] == ms(T0) + 1000
    assert timestamp_ms("not a time") is None
    assert timestamp_ms(datetime(1969, 12, 31, 23, 59, tzinfo=UTC)) is None


def test_other_values_json_cannot_carry_travel_as_their_text(pb: ModuleType) -> None:
    node, _ = connected_node()
    big = sample("big", None, "bad", reason="out of range")
    big["value_text"] = str(1 << 70)
    nested = sample("curve", None, "bad", reason="not a number")
    nested["value_text"] = "[1.0, NaN]"
    dbirth, ddata = node.encode(record([big, nested]))
    defs = {m.name: m for m in decode(pb, dbirth.payload).metrics}
    assert {n: m.datatype for n, m in defs.items()} == {"big": STRING, "curve": STRING}
    data = decode(pb, ddata.payload).metrics
    assert [m.string_value for m in data] == [str(1 << 70), "[1.0, NaN]"]
    assert [properties(m)["Reason"] for m in data] == ["out of range", "not a number"]


def test_integers_beyond_64_bits_travel_as_text(pb: ModuleType) -> None:
    raw = {"big": sample("big", 1 << 70), "neg": sample("neg", -(1 << 64))}
    node = SparkplugNode(AGENT, mqtt(), latest=lambda d: raw)
    node.device_state("press", "up")
    (dbirth,) = node.pending()
    defs = {m.name: m for m in decode(pb, dbirth.payload).metrics}
    assert {n: (m.datatype, m.string_value) for n, m in defs.items()} == {
        "big": (STRING, str(1 << 70)),
        "neg": (STRING, str(-(1 << 64))),
    }


def as_buffered(samples: list[dict[str, Any]]) -> bytes:
    """Samples as the buffer stores them (orjson, docs/mqtt.md): non-finite floats and
    integers beyond 64 bits null with their value_text; inside lists, big integers as
    text (orjson cannot write them)."""

    def fix(v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < 1 << 64:
            return str(v)
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    def as_stored(s: dict[str, Any]) -> dict[str, Any]:
        v = s["value"]
        if isinstance(v, int) and not isinstance(v, bool) and fix(v) != v:
            return {**s, "value": None, "quality": "bad", "reason": "out of range",
                    "value_text": str(v)}  # fmt: skip
        return {**stored(s), "value": fix(stored(s)["value"])}

    return orjson.dumps([as_stored(s) for s in samples])


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
_values = (
    _scalars | st.lists(_scalars, max_size=30) | st.dictionaries(st.text(max_size=5), _scalars)
)
_times = (
    st.none()
    | st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    )
    | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=12),
            _values,
            st.sampled_from(["good", "uncertain", "bad"]),
            _times,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_any_value_and_timestamp_encodes_and_decodes(pb: ModuleType, rows: list[Any]) -> None:
    samples = [
        sample(tag, value, quality, seq=i + 1, ts_source=ts)
        for i, (tag, value, quality, ts) in enumerate(rows)
    ]
    latest = {s["tag"]: s for s in samples}  # raw: NaN, Inf, big ints, datetimes
    node = SparkplugNode(AGENT, mqtt(), latest=lambda d: latest)
    node.next_will()
    node.on_connect()
    node.device_state("press", "up")
    msgs = node.pending()
    data = as_buffered(samples)
    rec = Record(
        id=1,
        device="press",
        first_seq=1,
        last_seq=len(rows),
        count=len(rows),
        created=0.0,
        data=data,
    )
    msgs += node.encode(rec)
    node.request_rebirth()
    msgs += node.pending()
    for msg in msgs:
        decoded = decode(pb, node.stamp(msg).payload)  # parses: the encoding is valid
        for m in decoded.metrics:
            assert not m.HasField("timestamp") or m.timestamp <= ms(
                datetime(9999, 12, 31, tzinfo=UTC)
            )
    ddata = next(m for m in msgs if "/DDATA/" in m.topic)
    by_tag = {s["tag"]: i for i, s in enumerate(samples)}
    metrics = decode(pb, ddata.payload).metrics
    assert len(metrics) == len(samples)  # every sample is a metric
    births = [m for m in msgs if "/DBIRTH/" in m.topic]
    born = {m.name for b in births for m in decode(pb, b.payload).metrics}
    assert born == set(by_tag)  # every tag declared, with or without a value
    for s, m in zip(samples, metrics, strict=True):
        v = s["value"]
        if isinstance(v, float) and math.isnan(v) and latest[s["tag"]] is s:
            assert math.isnan(m.double_value)
        elif isinstance(v, float) and latest[s["tag"]] is s and not m.is_null:
            assert m.double_value == v
