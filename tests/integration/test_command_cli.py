"""`edge-agent write` as a process: against the Modbus simulator (`--simulate`), exit codes
and output, and refused while an agent runs with the same audit log."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_commands_mqtt import config_text
from tests.support.agent_proc import ROOT, AgentProcess, cli, wait_until
from tests.support.broker import MosquittoBroker, free_port
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "line4.yaml"
    path.write_text(config_text(tmp_path, free_port()))
    return path


def test_write_against_the_simulator(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    out = cli("write", str(path), "press", "f32_cdab", "-1234.5", "--simulate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("done: press.f32_cdab = -1234.5 (raw -1234.5; was ")
    assert out.stdout.endswith("holds -1234.5, verified)\n")
    out = cli("write", str(path), "press", "temp_sp", "301", "--simulate")
    assert out.returncode == 3
    assert "refused (above_max): press.temp_sp: 301 is above max 300\n" in out.stderr
    # No broker at the configured port: the audit stays in the local log, and says so.
    assert out.stderr.endswith("audit: in the local log only (broker: connection refused)\n")
    out = cli("write", str(path), "press", "recipe", '"R-1234567"', "--simulate")
    assert out.returncode == 3  # 9 characters do not fit 4 registers: the driver refuses
    assert "refused (driver_refused): press.recipe:" in out.stderr
    records = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(records) == 5  # accepted + done, refused, accepted + driver_refused
    assert '"channel":"cli"' in records[0]


def test_the_audit_records_are_published_on_the_audit_topic(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Like a command's, the write's audit records also go to commands.audit_topic."""
    path = tmp_path / "line4.yaml"
    path.write_text(config_text(tmp_path, broker.port))
    with Subscriber(broker.host, broker.port, "#") as sub:
        out = cli("write", str(path), "press", "temp_sp", "25", "--simulate")
        assert out.returncode == 0, out.stderr
        got = sub.wait_for(lambda m: len([x for x in m if "audit" in x.topic]) >= 2)
    published = [json.loads(m.payload) for m in got if "audit" in m.topic]
    local = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert published == local  # accepted, then done: the same records
    assert [r["event"] for r in published] == ["accepted", "result"]
    assert published[-1]["result"] == "done"
    topic = next(m.topic for m in got if "audit" in m.topic)
    assert out.stderr.endswith(f"audit: published on {topic}\n")


def test_write_is_refused_while_the_agent_runs(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with AgentProcess(tmp_path / "agent.log", "run", str(path), "--simulate") as agent:
        deadline = time.monotonic() + 30
        while "agent.started" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "agent.started" in agent.log(), agent.log()
        out = cli("write", str(path), "press", "temp_sp", "25", "--simulate")
        assert agent.terminate() == 0
    assert "command.enabled" in agent.log()
    assert out.returncode == 3
    assert "is held by another process (is the agent running?)" in out.stderr


def test_the_demo_config_with_mosquitto_clients(tmp_path: Path, broker: MosquittoBroker) -> None:
    """The commands in configs/demo-commands.yaml's header, as written there."""
    env = {
        "MQTT_PORT": str(broker.port),
        "EDGE_BUFFER": str(tmp_path / "buffer.db"),
        "EDGE_AUDIT": str(tmp_path / "audit.jsonl"),
    }
    config = str(ROOT / "configs" / "demo-commands.yaml")
    assert cli("validate", config, "--simulate", env=env).returncode == 0
    plain = cli("validate", config, env=env)
    assert plain.returncode == 2
    assert "commands need a TLS broker connection (mqtt.tls)" in plain.stderr
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-V",
            "mqttv5",
            "-p",
            str(broker.port),
            "-t",
            "demo/results",
            "-t",
            "edge-audit/gw-cmd-demo",
            "-C",
            "3",
            "-W",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with AgentProcess(tmp_path / "agent.log", "run", config, "--simulate", env=env) as agent:
            wait_until(lambda: '"mqtt.connected"' in agent.log(), 60, "broker", agent)
            wait_until(lambda: "device.connected" in agent.log(), 60, "device", agent)
            time.sleep(0.5)  # mosquitto_sub is subscribed by now (it started first)
            pub = subprocess.run(
                [
                    "mosquitto_pub",
                    "-V",
                    "mqttv5",
                    "-p",
                    str(broker.port),
                    "-t",
                    "edge-cmd/gw-cmd-demo/write",
                    "-q",
                    "1",
                    "-D",
                    "publish",
                    "response-topic",
                    "demo/results",
                    "-D",
                    "publish",
                    "correlation-data",
                    "order-1",
                    "-D",
                    "publish",
                    "user-property",
                    "user",
                    "anna",
                    "-m",
                    '{"device": "press-1", "tag": "temp_sp", "value": 72.5}',
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert pub.returncode == 0, pub.stderr
            out, _ = sub.communicate(timeout=60)
            assert agent.terminate() == 0
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    bodies = [json.loads(line) for line in out.splitlines()]
    (result,) = [b for b in bodies if "event" not in b]
    assert (result["result"], result["holds"], result["previous"]) == ("done", 72.5, 70.0)
    assert {(b["event"], b["who"]["user"]) for b in bodies if "event" in b} == {
        ("accepted", "anna"),
        ("result", "anna"),
    }
