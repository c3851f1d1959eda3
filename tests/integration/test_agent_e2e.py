"""The real agent process, real pymodbus simulators and a real mosquitto.

Assertions are on what a subscriber receives: values of every type and byte order,
qualities, and seq continuity through broker outages and restarts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import (
    AgentProcess,
    assert_continuous,
    cli,
    counter_device,
    last_seq_logged,
    samples_of,
    seqs,
    wait_until,
)
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration

# (tag name, type, byte order, constant value, extra keys)
TYPED: list[tuple[str, str, str | None, Any, dict[str, Any]]] = [
    ("i16_abcd", "int16", "ABCD", -1234, {}),
    ("i16_badc", "int16", "BADC", -1234, {}),
    ("u16", "uint16", None, 54321, {}),
    ("i32_abcd", "int32", "ABCD", -123456789, {}),
    ("i32_cdab", "int32", "CDAB", -123456789, {}),
    ("i32_badc", "int32", "BADC", -123456789, {}),
    ("i32_dcba", "int32", "DCBA", -123456789, {}),
    ("u32_abcd", "uint32", "ABCD", 4000000000, {}),
    ("u32_cdab", "uint32", "CDAB", 4000000000, {}),
    ("i64_abcd", "int64", "ABCD", -1234567890123, {}),
    ("i64_cdab", "int64", "CDAB", -1234567890123, {}),
    ("i64_badc", "int64", "BADC", -1234567890123, {}),
    ("i64_dcba", "int64", "DCBA", -1234567890123, {}),
    ("u64_dcba", "uint64", "DCBA", 18000000000000000000, {}),
    ("f32_abcd", "float32", "ABCD", 123.456, {}),
    ("f32_cdab", "float32", "CDAB", 123.456, {}),
    ("f32_badc", "float32", "BADC", 123.456, {}),
    ("f32_dcba", "float32", "DCBA", 123.456, {}),
    ("f64_abcd", "float64", "ABCD", -9876.54321, {}),
    ("f64_cdab", "float64", "CDAB", -9876.54321, {}),
    ("f64_badc", "float64", "BADC", -9876.54321, {}),
    ("f64_dcba", "float64", "DCBA", -9876.54321, {}),
    ("str_abcd", "string", "ABCD", "HELLO", {"length": 3}),
    ("str_badc", "string", "BADC", "HELLO", {"length": 3}),
    ("scaled", "int16", None, 21.5, {"scale": 0.1, "unit": "degC"}),
]


def typed_tags() -> str:
    lines = []
    address = 0
    for name, kind, order, value, extra in TYPED:
        count = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}.get(kind, 4)
        if kind == "string":
            count = extra["length"]
        fields = [f"name: {name}", f"address: {address}", f"type: {kind}"]
        if order:
            fields.append(f"byte_order: {order}")
        fields += [f"{k}: {v}" for k, v in extra.items()]
        shown = f'"{value}"' if isinstance(value, str) else value
        fields.append(f"simulate: {{generator: constant, value: {shown}}}")
        lines.append("      - {" + ", ".join(fields) + "}")
        address += count
    lines.append(
        f"      - {{name: bit3, address: {address}, type: bit, bit: 3, "
        "simulate: {generator: constant, value: true}}"
    )
    lines.append(
        "      - {name: coil0, table: coil, address: 0, type: bool, "
        "simulate: {generator: constant, value: true}}"
    )
    lines.append(
        "      - {name: di0, table: discrete_input, address: 0, type: bool, "
        "simulate: {generator: constant, value: false}}"
    )
    return "\n".join(lines)


def write_config(
    tmp: Path,
    broker: MosquittoBroker,
    devices: str,
    *,
    name: str = "agent.yaml",
    buffer: str | None = None,
) -> Path:
    path = tmp / name
    path.write_text(
        f"""\
agent:
  id: gw-test
  site: s1
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  reconnect_min_s: 0.2
  reconnect_max_s: 1
buffer:
  path: {buffer or tmp / "buffer.db"}
logging:
  level: debug
  format: json
devices:
{devices}
"""
    )
    return path


def typed_device(port: int = 0) -> str:
    return f"""\
  - name: types
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    interval_s: 0.2
    timeout_s: 0.5
    retries: 0
    backoff_min_s: 0.2
    backoff_max_s: 1
    tags:
{typed_tags()}
"""


def test_every_type_and_byte_order_arrives_decoded(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path, broker, typed_device())
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(lambda: len(sub.messages()) >= 3, 60, "3 messages", agent)
        code = agent.terminate()
    assert code == 0, agent.log()
    msgs = sub.messages()
    assert {m.topic for m in msgs} == {"edge/gw-test/types"}
    latest: dict[str, dict[str, Any]] = {}
    for s in samples_of(msgs):
        latest[str(s["tag"])] = s
    for name, kind, _, value, extra in TYPED:
        sample = latest[name]
        assert sample["quality"] == "good", sample
        if kind.startswith("float") or "scale" in extra:
            assert math.isclose(sample["value"], value, rel_tol=1e-6), (name, sample)
        else:
            assert sample["value"] == value, (name, sample)
    assert latest["scaled"]["unit"] == "degC"
    assert latest["bit3"]["value"] is True
    assert latest["coil0"]["value"] is True
    assert latest["di0"]["value"] is False
    assert_continuous(seqs(msgs))


def test_exception_response_gives_bad_quality_others_stay_good(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = write_config(tmp_path, broker, counter_device("plc"), name="served.yaml")
    with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
        name, protocol, endpoint = sim.read_line().split("\t")
        assert (name, protocol) == ("plc", "modbus")
        port = int(endpoint.rsplit(":", 1)[1])
        polled = write_config(
            tmp_path,
            broker,
            f"""\
  - name: plc
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    interval_s: 0.2
    tags:
      - {{name: count, address: 0, type: uint32}}
      - {{name: missing, address: 500, type: uint16}}
""",
        )
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(polled)) as agent,
        ):
            wait_until(lambda: len(sub.messages()) >= 2, 60, "2 messages", agent)
            assert agent.terminate() == 0
    by_tag = {str(s["tag"]): s for s in samples_of(sub.messages())}
    assert by_tag["count"]["quality"] == "good"
    assert by_tag["missing"]["quality"] == "bad"
    assert by_tag["missing"]["value"] is None
    assert by_tag["missing"]["code"] == 2
    assert "illegal data address" in str(by_tag["missing"]["reason"])


def test_broker_outage_of_20s_loses_no_sample(tmp_path: Path) -> None:
    # The consumer keeps a persistent session on a broker with persistence on, as a
    # platform's ingest would: what the agent publishes while the consumer is not yet back
    # is queued for it, so the subscriber sees everything the agent delivered.
    devices = counter_device("line-a") + counter_device("line-b", 0.25)
    with MosquittoBroker(persistent=True) as broker:
        config = write_config(tmp_path, broker, devices)
        sub = Subscriber(
            "127.0.0.1", broker.port, "edge/#", client_id="consumer", session_expiry_s=3600
        )
        with sub, AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent:
            wait_until(lambda: len(sub.messages()) >= 5, 60, "first messages", agent)
            broker.stop()
            time.sleep(20)
            broker.start()
            # Wait for everything produced during the outage, and more, then stop.
            target = max(seqs(sub.messages())) + 600
            wait_until(lambda: max(seqs(sub.messages())) > target, 90, "backlog to drain", agent)
            assert agent.terminate() == 0
            produced = last_seq_logged(agent)
            wait_until(lambda: max(seqs(sub.messages())) >= produced, 30, "the last sample")
    received = seqs(sub.messages())
    assert_continuous(received)
    assert max(received) == produced
    duplicates = len(received) - len(set(received))
    assert duplicates <= 100 * 2 * 10, duplicates  # bounded by the in-flight window
    assert '"device.down"' not in agent.log()  # the PLCs never went down


def test_sigterm_keeps_the_buffer_and_seq_continues(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = write_config(tmp_path, broker, counter_device("plc"))
    broker.stop()
    first = AgentProcess(
        tmp_path / "agent1.log", "run", str(config), "--simulate", "--grace-s", "1"
    )
    with first:
        wait_until(lambda: "agent.started" in first.log(), 60, "start", first)
        time.sleep(2)  # polls land in the buffer; the broker is down
        assert first.terminate() == 0, first.log()
    assert "agent.stopping.buffer_kept" in first.log()
    broker.start()
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent2.log", "run", str(config), "--simulate") as second,
    ):
        wait_until(lambda: len(sub.messages()) >= 20, 60, "backlog and new data", second)
        assert second.terminate() == 0
    assert_continuous(seqs(sub.messages()))


def test_validate_reports_three_mistakes_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """\
agent:
  id: gw
mqtt:
  prot: 1883
devices:
  - name: plc
    protocol: modbus
    host: 127.0.0.1
    tags:
      - {name: t, address: 0, type: flaot32}
      - {name: u, address: 70000}
"""
    )
    result = cli("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"{bad}: 3 problems found:"
    assert [line.split(" ", 3)[2] for line in lines[1:]] == [
        f"{bad}:4",
        f"{bad}:10",
        f"{bad}:11",
    ]
    assert "Traceback" not in result.stderr
    ok = cli("validate", "configs/demo-plant.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "OK (3 devices" in ok.stdout


def test_run_with_invalid_config_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"agent: {{id: gw}}\nbuffer: {{path: {tmp_path / 'b.db'}}}\ndevices: []\n")
    result = cli("run", str(bad))
    assert result.returncode == 2
    assert "devices: List should have at least 1 item" in result.stderr
    assert not (tmp_path / "b.db").exists()


@pytest.mark.parametrize("command", ["run", "validate", "simulate", "schema", "plan", "watch"])
def test_help(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "usage: edge-agent" in result.stdout
