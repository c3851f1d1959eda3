"""The simulator-mode demo as a Sparkplug B edge node, against a real mosquitto.

`edge-agent run configs/demo-sparkplug.yaml --simulate` is the real agent process; a
subscriber decodes what the broker delivers with bindings generated from the published
sparkplug_b.proto (tests/unit/test_sparkplug.py), independently of the agent's encoder.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import publish

from tests.integration.conftest import SubscriberFactory
from tests.support.agent_proc import AgentProcess
from tests.support.broker import MosquittoBroker
from tests.support.sparkplug import generate_bindings
from tests.support.subscriber import Received

pytestmark = pytest.mark.integration

GROUP = "demo-plant"
NODE = "gw-demo"
DEVICES = {"press-1", "oven-ctrl", "packer-2"}


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return generate_bindings(tmp_path_factory.mktemp("sparkplug_pb"))


def kind(msg: Received) -> str:
    return msg.topic.split("/")[2]


def device(msg: Received) -> str | None:
    parts = msg.topic.split("/")
    return parts[4] if len(parts) > 4 else None


def decode(pb: ModuleType, msg: Received) -> Any:
    payload = pb.Payload()
    payload.ParseFromString(msg.payload)
    return payload


def bdseq(pb: ModuleType, msg: Received) -> int:
    values = [m.long_value for m in decode(pb, msg).metrics if m.name == "bdSeq"]
    assert len(values) == 1, msg
    return int(values[0])


def agent(tmp_path: Path, broker: MosquittoBroker, name: str) -> AgentProcess:
    return AgentProcess(
        tmp_path / f"{name}.log",
        "run",
        "configs/demo-sparkplug.yaml",
        "--simulate",
        env={
            "MQTT_PORT": str(broker.port),
            "EDGE_BUFFER": str(tmp_path / "buffer.db"),
            "EDGE_HTTP_PORT": "0",
        },
    )


def session_after(msgs: list[Received], start: int) -> list[Received]:
    """Messages from the NBIRTH at index `start` up to the next NBIRTH or NDEATH."""
    out = [msgs[start]]
    for m in msgs[start + 1 :]:
        if kind(m) in ("NBIRTH", "NDEATH"):
            break
        out.append(m)
    return out


def born_and_reporting(msgs: list[Received], start: int) -> bool:
    session = session_after(msgs, start)
    births = {device(m) for m in session if kind(m) == "DBIRTH"}
    data = {device(m) for m in session if kind(m) == "DDATA"}
    return births >= DEVICES and data >= DEVICES


def nbirths(msgs: list[Received]) -> list[int]:
    return [i for i, m in enumerate(msgs) if kind(m) == "NBIRTH"]


def check_session(pb: ModuleType, session: list[Received]) -> None:
    """seq runs 0, 1, 2, ... (mod 256) from the NBIRTH; every DDATA metric's alias was
        defined by that device's DBIRTH; births carry datatypes and current values, data only
    aliases."""
    seqs = [decode(pb, m).seq for m in session]
    assert seqs == [i % 256 for i in range(len(seqs))], seqs
    defined: dict[str, dict[int, int]] = {}
    aliases: set[int] = {1}  # Node Control/Rebirth
    for m in session:
        payload = decode(pb, m)
        dev = device(m)
        if kind(m) == "DBIRTH":
            assert dev is not None
            assert all(x.name for x in payload.metrics)
            assert all(x.HasField("datatype") for x in payload.metrics)
            for x in payload.metrics:
                props = dict(zip(x.properties.keys, x.properties.values, strict=True))
                # Births are complete: a good metric carries its current value.
                assert x.is_null == (props["Quality"].int_value == 0), x
                assert x.timestamp > 0
            defined[dev] = {x.alias: x.datatype for x in payload.metrics}
            for other, table in defined.items():
                if other != dev:
                    assert not set(table) & set(defined[dev]), "aliases must be node-unique"
            aliases |= set(defined[dev])
        elif kind(m) == "DDATA":
            assert dev in defined, f"DDATA for {dev} before its DBIRTH"
            assert payload.metrics
            for x in payload.metrics:
                assert x.alias in defined[dev]
                assert not x.HasField("datatype")  # only births carry it
                assert x.timestamp > 0
                qualities = dict(zip(x.properties.keys, x.properties.values, strict=True))
                assert qualities["Quality"].int_value in (0, 64, 192)


def test_demo_births_data_rebirth_and_death(
    tmp_path: Path,
    broker: MosquittoBroker,
    subscriber_factory: SubscriberFactory,
    pb: ModuleType,
) -> None:
    sub = subscriber_factory(broker, "spBv1.0/#")
    first = agent(tmp_path, broker, "first").start()
    try:
        msgs = sub.wait_for(
            lambda ms: bool(nbirths(ms)) and born_and_reporting(ms, nbirths(ms)[0]),
            timeout_s=60,
        )
        start = nbirths(msgs)[0]
        nbirth = msgs[start]
        assert nbirth.topic == f"spBv1.0/{GROUP}/NBIRTH/{NODE}"
        b0 = bdseq(pb, nbirth)
        assert b0 == 0  # a fresh buffer directory: the first bdSeq
        names = {m.name for m in decode(pb, nbirth).metrics}
        assert names == {"bdSeq", "Node Control/Rebirth", "Node Info/Buffer Epoch"}
        [epoch] = [m for m in decode(pb, nbirth).metrics if m.name == "Node Info/Buffer Epoch"]
        assert len(epoch.string_value) == 32  # the buffer's epoch, wired by the runtime
        check_session(pb, session_after(msgs, start))
        births = {
            device(m): {x.name for x in decode(pb, m).metrics}
            for m in session_after(msgs, start)
            if kind(m) == "DBIRTH"
        }
        assert births["press-1"] >= {"power_kw", "voltage_v", "energy_kwh", "running"}
        assert births["oven-ctrl"] >= {"temperature", "recipe", "alarm_overtemp"}

        # A host asks for a rebirth: NBIRTH (same bdSeq, seq 0) and every DBIRTH again.
        cmd = pb.Payload()
        metric = cmd.metrics.add()
        metric.name = "Node Control/Rebirth"
        metric.datatype = 11  # Boolean
        metric.boolean_value = True
        publish.single(
            f"spBv1.0/{GROUP}/NCMD/{NODE}",
            cmd.SerializeToString(),
            qos=1,
            hostname=broker.host,
            port=broker.port,
            protocol=mqtt.MQTTv5,
        )
        msgs = sub.wait_for(
            lambda ms: len(nbirths(ms)) >= 2 and born_and_reporting(ms, nbirths(ms)[1]),
            timeout_s=30,
        )
        second = nbirths(msgs)[1]
        assert bdseq(pb, msgs[second]) == b0
        check_session(pb, session_after(msgs, second))
        assert not any(kind(m) == "NDEATH" for m in msgs)

        # SIGKILL: the broker delivers the will, an NDEATH with the NBIRTH's bdSeq.
        first.kill()
        msgs = sub.wait_for(lambda ms: any(kind(m) == "NDEATH" for m in ms), timeout_s=30)
        (ndeath,) = [m for m in msgs if kind(m) == "NDEATH"]
        assert ndeath.topic == f"spBv1.0/{GROUP}/NDEATH/{NODE}"
        assert not ndeath.retain
        assert bdseq(pb, ndeath) == b0
        assert not decode(pb, ndeath).HasField("seq")
    finally:
        first.close()

    # A restart continues the bdSeq from the file next to the buffer.
    count = len(sub.messages())
    second_run = agent(tmp_path, broker, "second").start()
    try:
        msgs = sub.wait_for(lambda ms: any(kind(m) == "NBIRTH" for m in ms[count:]), timeout_s=60)
        restart = next(i for i in range(count, len(msgs)) if kind(msgs[i]) == "NBIRTH")
        assert bdseq(pb, msgs[restart]) == b0 + 1
        assert (tmp_path / "buffer.db.sparkplug-bdseq").read_text().strip() == str(b0 + 1)
        assert second_run.terminate() == 0
        # A clean stop publishes the NDEATH itself (a clean DISCONNECT drops the will).
        msgs = sub.wait_for(lambda ms: any(kind(m) == "NDEATH" for m in ms[restart:]), timeout_s=30)
        (ndeath2,) = [m for m in msgs[restart:] if kind(m) == "NDEATH"]
        assert bdseq(pb, ndeath2) == b0 + 1
        check_session(pb, session_after(msgs, restart))
    finally:
        second_run.close()
    assert "Traceback" not in first.log() + second_run.log()
