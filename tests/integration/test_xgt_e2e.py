"""The real agent process polling XGT simulators, samples at a real mosquitto."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import (
    AgentProcess,
    assert_continuous,
    cli,
    samples_of,
    seqs,
    wait_until,
)
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration

# (tag name, address, type, constant value, extra keys)
TYPED: list[tuple[str, str, str | None, Any, dict[str, Any]]] = [
    ("speed", "%DW100", None, 1480, {}),
    ("temp", "%DW101", "int16", 21.5, {"scale": 0.1, "unit": "degC"}),
    ("flow", "%DW102", "float32", 12.75, {}),
    ("total", "%DW104", "uint32", 4_000_000_000, {}),
    ("energy", "%DW106", "float64", -9876.54321, {}),
    ("count64", "%DL2", "int64", -1_234_567_890_123, {}),
    ("recipe", "%DB40", "string", "AB-12", {"length": 8}),
    ("running", "%MX1600", None, True, {}),
    ("alarm", "%MX1601", None, False, {}),
    ("door", "%PX5", None, True, {}),
    ("fault_bit", "%MW200", "bit", True, {"bit": 12}),
    ("timer_done", "%TX4", None, True, {}),
]


def tag_lines(extra: str = "") -> str:
    lines = []
    for name, address, kind, value, keys in TYPED:
        fields = [f"name: {name}", f'address: "{address}"']
        if kind:
            fields.append(f"type: {kind}")
        fields += [f"{k}: {v}" for k, v in keys.items()]
        shown = f'"{value}"' if isinstance(value, str) else str(value).lower()
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            shown = str(value)
        fields.append(f"simulate: {{generator: constant, value: {shown}}}")
        lines.append("      - {" + ", ".join(fields) + "}")
    return "\n".join(lines) + extra


def xgt_device(port: int = 0, extra: str = "") -> str:
    return f"""\
  - name: press
    protocol: xgt
    host: 127.0.0.1
    port: {port}
    cpu: XGK
    interval_s: 0.1
    timeout_s: 0.5
    backoff_min_s: 0.2
    backoff_max_s: 1
    tags:
{tag_lines(extra)}
"""


def write_config(tmp: Path, broker: MosquittoBroker, devices: str, name: str = "a.yaml") -> Path:
    path = tmp / name
    path.write_text(
        f"""\
agent:
  id: gw-xgt
  site: s1
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  reconnect_min_s: 0.2
  reconnect_max_s: 1
buffer:
  path: {tmp / name}.db
logging:
  level: debug
  format: json
devices:
{devices}
"""
    )
    return path


def test_run_simulate_delivers_exact_values(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path, broker, xgt_device())
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(lambda: len(sub.messages()) >= 5, 60, "5 messages", agent)
        code = agent.terminate()
    assert code == 0, agent.log()
    msgs = sub.messages()
    assert {m.topic for m in msgs} == {"edge/gw-xgt/press"}
    latest = {str(s["tag"]): s for s in samples_of(msgs)}
    for name, _, _, value, _ in TYPED:
        sample = latest[name]
        assert sample["quality"] == "good", sample
        if isinstance(value, float):
            assert math.isclose(float(sample["value"]), value, rel_tol=1e-6), sample  # type: ignore[arg-type]
        else:
            assert sample["value"] == value, sample
    assert latest["temp"]["unit"] == "degC"
    assert_continuous(seqs(msgs))


def test_a_tag_the_plc_does_not_serve_is_bad_with_the_code(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = write_config(tmp_path, broker, xgt_device(), name="served.yaml")
    with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
        name, protocol, endpoint = sim.read_line().split("\t")
        assert (name, protocol) == ("press", "xgt")
        port = int(endpoint.rsplit(":", 1)[1])
        extra = '\n      - {name: missing, address: "%DW900"}'
        polled = write_config(tmp_path, broker, xgt_device(port, extra), name="polled.yaml")
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(polled)) as agent,
        ):
            wait_until(lambda: len(sub.messages()) >= 3, 60, "3 messages", agent)
            assert agent.terminate() == 0
    latest = {str(s["tag"]): s for s in samples_of(sub.messages())}
    assert latest["speed"]["quality"] == "good"
    assert latest["speed"]["value"] == 1480
    missing = latest["missing"]
    assert (missing["quality"], missing["value"], missing["code"]) == ("bad", None, 4)
    assert missing["reason"] == "xgt error 0x0004 (address beyond the device area)"


def test_plan_shows_the_requests_of_each_poll(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path, broker, xgt_device())
    result = cli("plan", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "device press (xgt XGK 127.0.0.1:0, 12 tags)",
        "  group default every 0.1 s: 12 tags, 6 requests per poll",
        "    continuous %DB16 x 8 bytes (1 tag)",
        "    continuous %DB40 x 8 bytes (1 tag)",
        "    continuous %DB200 x 20 bytes (5 tags)",
        "    continuous %MB200 x 1 byte (2 tags)",
        "    continuous %MB400 x 2 bytes (1 tag)",
        "    individual X x 2 (%PX5 %TX4; 2 tags)",
        "  total: 60 requests/s",
    ]


def test_plc_restart_gives_bad_samples_then_values_again(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = write_config(tmp_path, broker, xgt_device(), name="served.yaml")
    sim = AgentProcess(tmp_path / "sim1.log", "simulate", str(served)).start()
    try:
        port = int(sim.read_line().split("\t")[2].rsplit(":", 1)[1])
        polled = write_config(tmp_path, broker, xgt_device(port), name="polled.yaml")
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(polled)) as agent,
        ):
            wait_until(lambda: len(sub.messages()) >= 3, 60, "first values", agent)
            sim.kill()  # the PLC goes away
            sim.close()
            wait_until(lambda: '"device.down"' in agent.log(), 30, "device.down", agent)
            # The outage is published once (down devices report again only every
            # down_report_interval_s), possibly before device.down was read.
            wait_until(
                lambda: any(s["quality"] == "bad" for s in samples_of(sub.messages())),
                30,
                "bad samples",
                agent,
            )
            restarted = write_config(
                tmp_path, broker, xgt_device(port), name="served2.yaml"
            )  # same port: the PLC is back
            sim = AgentProcess(tmp_path / "sim2.log", "simulate", str(restarted)).start()
            sim.read_line()
            wait_until(lambda: '"device.recovered"' in agent.log(), 60, "device.recovered", agent)
            count = len(sub.messages())
            wait_until(lambda: len(sub.messages()) >= count + 3, 30, "values again", agent)
            assert agent.terminate() == 0
    finally:
        sim.close()
    samples = [s for s in samples_of(sub.messages()) if s["tag"] == "speed"]
    qualities = [s["quality"] for s in samples]
    first_bad = qualities.index("bad")
    assert "good" in qualities[first_bad:], qualities
    bad = samples[first_bad]
    assert bad["value"] is None
    assert bad["reason"] in ("connection lost", "connection refused", "timeout"), bad
    assert (samples[-1]["quality"], samples[-1]["value"]) == ("good", 1480)
    assert_continuous(seqs(sub.messages()))


def test_probe_reads_addresses_and_shows_the_plc_state(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = write_config(tmp_path, broker, xgt_device(), name="served.yaml")
    with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
        port = sim.read_line().split("\t")[2].rsplit(":", 1)[1]
        good = cli(
            "xgt", "probe", "127.0.0.1", "--port", port, "--address", "%DW100", "--address", "%TX4"
        )
        refused = cli("xgt", "probe", "127.0.0.1", "--port", port, "--address", "%DW900")
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [
        f"127.0.0.1:{port}: connected, PLC RUN, CPU info 0xA0",
        "%DW100\tgood\t1480",
        "%TX4\tgood\tTrue",
    ]
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[1] == (
        "%DW900\tbad\txgt error 0x0004 (address beyond the device area)"
    )
    wrong_area = cli("xgt", "probe", "127.0.0.1", "--address", "%IX0")
    assert wrong_area.returncode == 2
    assert "area I is not served by XGK" in wrong_area.stderr
