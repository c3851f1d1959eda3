"""The serial examples run as an operator runs them (`edge-agent run CONFIG --simulate`):
eight units on one RS-485 line (served on a pty pair with real RTU framing and line
timing) and eight behind one RTU-over-TCP serial device server, all through the registry's
shared links, deliver good samples to a real mosquitto; `edge-agent simulate` says where
each unit is served."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, samples_of
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LINE = {f"meter-{i}" for i in range(1, 5)} | {f"oven-{i}" for i in range(5, 9)}
GATEWAY = {f"line2-meter-{i}" for i in range(1, 9)}


@pytest.mark.parametrize(
    ("config", "names"),
    [("modbus-serial-line.yaml", LINE), ("modbus-serial-gateway.yaml", GATEWAY)],
)
def test_every_unit_on_a_shared_link_delivers_in_simulator_mode(
    tmp_path: Path, broker: MosquittoBroker, config: str, names: set[str]
) -> None:
    env = {"MQTT_PORT": str(broker.port), "EDGE_BUFFER": str(tmp_path / "buffer.db")}

    def every_unit_answered(messages: list[Received]) -> bool:
        good = {s["device"] for s in samples_of(messages) if s["quality"] == "good"}
        return good >= names

    with (
        Subscriber("127.0.0.1", broker.port, "#") as sub,
        AgentProcess(
            tmp_path / "agent.log", "run", str(ROOT / "configs" / config), "--simulate", env=env
        ) as agent,
    ):
        sub.wait_for(every_unit_answered, timeout_s=90)
        assert agent.terminate() == 0, agent.log()
    bad = [s for s in samples_of(sub.messages()) if s["quality"] != "good"]
    assert bad == [], bad[:3]
    assert "Traceback" not in agent.log()


def test_simulate_prints_where_each_linked_unit_is_served(tmp_path: Path) -> None:
    env = {"EDGE_BUFFER": str(tmp_path / "buffer.db")}
    config = ROOT / "configs" / "modbus-serial-line.yaml"
    with AgentProcess(tmp_path / "sim.log", "simulate", str(config), env=env) as sim:
        lines = [sim.read_line(timeout_s=60) for _ in range(len(LINE))]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert set(rows) == LINE
    unit_of = {"meter-1": 1, "oven-8": 8}
    for name, unit in unit_of.items():
        _, protocol, where = rows[name]
        assert protocol == "modbus"
        assert where.startswith("/dev/pts/")
        assert where.endswith(f"(link line1, unit {unit})")
