"""OPC UA end to end: the real agent process, the OPC UA simulator (in-process in
simulator mode, or as its own `edge-agent simulate` process that a test kills and
restarts), SignAndEncrypt with user name login, and a real mosquitto."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import AgentProcess, cli, samples_of, wait_until
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def oven_config(tmp: Path, broker: MosquittoBroker, endpoint: str) -> Path:
    path = tmp / "oven.yaml"
    path.write_text(
        f"""\
agent: {{id: gw-oven}}
mqtt: {{port: {broker.port}, reconnect_min_s: 0.2, reconnect_max_s: 1}}
buffer: {{path: {tmp / "buffer.db"}}}
logging: {{level: info, format: json}}
devices:
  - name: oven
    protocol: opcua
    endpoint: {endpoint}
    security_policy: Basic256Sha256
    security_mode: SignAndEncrypt
    username: operator
    password: ${{OVEN_PASSWORD:-s3cret}}
    cert_dir: {tmp / "pki"}
    application_uri: urn:edge-agent:test
    interval_s: 0.5
    backoff_min_s: 0.2
    backoff_max_s: 1
    watchdog_interval_s: 1
    poll_groups:
      live: {{interval_s: 0.2, mode: subscribe}}
    tags:
      - {{name: temperature, node_id: "ns=2;s=Oven.Temperature", unit: degC, group: live,
          simulate: {{generator: ramp, min: 0, max: 1000, period_s: 100}}}}
      - {{name: zones, node_id: "ns=2;s=Oven.Zones", type: Float, array_length: 3}}
      - {{name: count, node_id: "ns=2;i=1001", type: UInt32}}
      - {{name: running, browse_path: "0:Objects/2:Oven/2:Running", type: Boolean}}
      - {{name: recipe, node_id: "ns=2;s=Oven.Recipe", type: Structure,
          fields: {{name: String, setpoint: Double}}}}
"""
    )
    return path


def latest(messages: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in samples_of(messages):
        out[str(s["tag"])] = s
    return out


def test_simulator_mode_sign_and_encrypt_typed_values(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = oven_config(tmp_path, broker, "opc.tcp://127.0.0.1:0/oven")
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(
            lambda: (
                {"temperature", "zones", "count", "running", "recipe"}
                <= set(latest(sub.messages()))
                and len([s for s in samples_of(sub.messages()) if s["tag"] == "temperature"]) >= 3
            ),
            60,
            "every tag, and subscribed values",
            agent,
        )
        assert agent.terminate() == 0
    values = latest(sub.messages())
    assert all(s["quality"] == "good" for s in values.values()), values
    assert isinstance(values["temperature"]["value"], float)
    assert values["temperature"]["unit"] == "degC"
    assert isinstance(values["zones"]["value"], list)
    assert len(values["zones"]["value"]) == 3
    assert isinstance(values["count"]["value"], int)
    assert isinstance(values["running"]["value"], bool)
    assert set(values["recipe"]["value"]) == {"name", "setpoint"}
    assert values["temperature"]["ts_source"] is not None
    temps = [s["value"] for s in samples_of(sub.messages()) if s["tag"] == "temperature"]
    assert len(set(temps)) >= 2  # pushed by the subscription as it changes


def test_untrusted_then_trusted_and_server_restart_recovers(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = oven_config(tmp_path, broker, "opc.tcp://127.0.0.1:0/oven")
    sim = AgentProcess(tmp_path / "sim.log", "simulate", str(served)).start()
    try:
        name, protocol, endpoint = sim.read_line(60).split("\t")
        assert (name, protocol) == ("oven", "opcua")
        config = oven_config(tmp_path, broker, endpoint)
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent,
        ):
            # Never trusted: refused, bad samples with the reason, and a hint in the log.
            wait_until(lambda: "untrusted server certificate" in agent.log(), 60, "refusal", agent)
            assert "edge-agent opcua trust" in agent.log()
            wait_until(lambda: bool(samples_of(sub.messages())), 30, "bad samples", agent)
            assert {s["quality"] for s in samples_of(sub.messages())} == {"bad"}

            trusted = cli("opcua", "trust", endpoint, "--cert-dir", str(tmp_path / "pki"))
            assert trusted.returncode == 0, trusted.stderr
            wait_until(
                lambda: latest(sub.messages()).get("count", {}).get("quality") == "good",
                60,
                "good data",
                agent,
            )

            # The server process dies and comes back on the same endpoint: the agent, untouched,
            # reports bad quality meanwhile and resumes by itself.
            assert sim.proc is not None
            sim.proc.send_signal(signal.SIGKILL)
            sim.close()
            n = len(sub.messages())
            wait_until(
                lambda: any(s["quality"] == "bad" for s in samples_of(sub.messages()[n:])),
                60,
                "bad while down",
                agent,
            )
            sim = AgentProcess(tmp_path / "sim2.log", "simulate", str(config)).start()
            assert sim.read_line(60).split("\t")[2] == endpoint
            n = len(sub.messages())
            wait_until(
                lambda: (
                    {"temperature", "count"}
                    <= {
                        str(s["tag"])
                        for s in samples_of(sub.messages()[n:])
                        if s["quality"] == "good"
                    }
                ),
                60,
                "data back after the restart",
                agent,
            )
            assert agent.terminate() == 0
        log = agent.log()
        assert log.count('"device.recovered"') >= 1
    finally:
        sim.close()


def test_browse_yaml_pastes_into_a_config_that_runs(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = oven_config(tmp_path, broker, "opc.tcp://127.0.0.1:0/oven")
    pki = str(tmp_path / "pki")
    env = {"OVEN_PASSWORD": "s3cret"}
    with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
        endpoint = sim.read_line(60).split("\t")[2]
        assert cli("opcua", "trust", endpoint, "--cert-dir", pki).returncode == 0
        security = [
            "--cert-dir", pki, "--security-policy", "Basic256Sha256",
            "--security-mode", "SignAndEncrypt", "--username", "operator",
            "--password-env", "OVEN_PASSWORD", "--application-uri", "urn:edge-agent:test",
        ]  # fmt: skip
        table = cli("opcua", "browse", endpoint, *security, env=env)
        assert table.returncode == 0, table.stderr
        assert "ns=2;s=Oven.Temperature" in table.stdout
        browsed = cli("opcua", "browse", endpoint, "--format", "yaml", *security, env=env)
        assert browsed.returncode == 0, browsed.stderr
        assert browsed.stdout.lstrip().startswith("tags:")
        # Paste the tags: section under a device, as an integrator would.
        tags = browsed.stdout.split("tags:", 1)[1]
        config = tmp_path / "browsed.yaml"
        config.write_text(
            f"""\
agent: {{id: gw-browse}}
mqtt: {{port: {broker.port}}}
buffer: {{path: {tmp_path / "b2.db"}}}
devices:
  - name: oven
    protocol: opcua
    endpoint: {endpoint}
    security_policy: Basic256Sha256
    username: operator
    password: ${{OVEN_PASSWORD}}
    cert_dir: {pki}
    application_uri: urn:edge-agent:test
    interval_s: 0.5
    tags:{_indent(tags, 4)}
"""
        )
        valid = cli("validate", str(config), env=env)
        assert valid.returncode == 0, valid.stderr + config.read_text()
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config), env=env) as agent,
        ):
            wait_until(lambda: len(latest(sub.messages())) >= 5, 60, "browsed tags", agent)
            assert agent.terminate() == 0
    values = latest(sub.messages())
    assert values["oven_temperature"]["quality"] == "good"
    # Variables of the server object that hold a null Variant (Auditing, LocalTime, ...)
    # are bad with the reason; every other browsed tag is good.
    bad = {(s["reason"], s["value"]) for s in values.values() if s["quality"] != "good"}
    assert bad <= {("null value", None)}


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line if line.strip() else line for line in text.splitlines())
