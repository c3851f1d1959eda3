"""The example line of twelve controllers built from one profile, run as an operator runs
it (`edge-agent run configs/temperature-line.yaml --simulate`): every controller delivers
the profile's tags, against a real mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, samples_of
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAMES = {f"tc-{i:02d}" for i in range(1, 13)}


def test_twelve_controllers_from_one_profile_all_deliver(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    env = {
        "MQTT_PORT": str(broker.port),
        "EDGE_BUFFER": str(tmp_path / "buffer.db"),
    }
    config = ROOT / "configs" / "temperature-line.yaml"

    def every_controller_answered(messages: list[Received]) -> bool:
        good = {s["device"] for s in samples_of(messages) if s["quality"] == "good"}
        return good >= NAMES

    with (
        Subscriber("127.0.0.1", broker.port, "plant-a/extrusion/line-7/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate", env=env) as agent,
    ):
        sub.wait_for(every_controller_answered, timeout_s=60)
        assert agent.terminate() == 0, agent.log()
    samples = samples_of(sub.messages())
    tags = {(s["device"], s["tag"]) for s in samples}
    assert {t for d, t in tags if d == "tc-07"} >= {"temperature", "output_pct", "alarm_high"}
    temps = [s["value"] for s in samples if s["tag"] == "temperature" and s["quality"] == "good"]
    assert temps
    assert all(isinstance(v, float) and 180.0 <= v <= 220.0 for v in temps), temps
    assert {s["unit"] for s in samples if s["tag"] == "temperature"} == {"degC"}
