"""The real agent process in simulator mode with its HTTP endpoint on: /metrics figures
move, /healthz and /readyz answer, and `edge-agent status` prints the same JSON."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent_proc import AgentProcess, cli
from tests.support.broker import MosquittoBroker, free_port

pytestmark = pytest.mark.integration


def sim_config(tmp: Path, broker_port: int, http_port: int, *, interval_s: float = 0.2) -> Path:
    """A two-device config for simulator mode with the HTTP endpoint on `http_port`."""
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent: {{id: gw-http, site: plant, area: a1, line: l1}}
buffer: {{path: {tmp / "buffer.db"}}}
mqtt: {{port: {broker_port}}}
http: {{host: 127.0.0.1, port: {http_port}}}
devices:
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: {interval_s}
    tags:
      - {{name: power_kw, address: 0, type: float32, unit: kW,
          simulate: {{generator: sine, min: 20, max: 80, period_s: 5}}}}
      - {{name: strokes, address: 2, type: uint32,
          simulate: {{generator: counter, value: 0, step: 1, period_s: 0.2}}}}
  - name: oven
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: {interval_s}
    tags:
      - {{name: temperature, address: 0, type: int16, scale: 0.1, unit: degC,
          simulate: {{generator: random_walk, min: 190, max: 210, step: 1}}}}
"""
    )
    return path


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_ready(base: str, agent: AgentProcess, timeout_s: float = 60) -> dict[str, object]:
    """Poll /readyz until 200 with every device up and the broker connected."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert agent.proc is not None
        assert agent.proc.poll() is None, agent.log()
        try:
            code, body = http_get(f"{base}/readyz")
        except OSError:
            time.sleep(0.1)
            continue
        status = json.loads(body)
        if (
            code == 200
            and status["mqtt"]["state"] == "connected"
            and status["devices"]
            and all(d["state"] == "up" and d["tags"] for d in status["devices"])
        ):
            return dict(status)
        time.sleep(0.1)
    raise AssertionError(f"agent not ready within {timeout_s} s; log:\n{agent.log()}")


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body = http_get(f"{base}/metrics")
    assert code == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_and_status_matches(tmp_path: Path, broker: MosquittoBroker) -> None:
    http_port = free_port()
    config = sim_config(tmp_path, broker.port, http_port)
    base = f"http://127.0.0.1:{http_port}"
    with AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent:
        wait_ready(base, agent)
        assert http_get(f"{base}/healthz") == (200, b"ok\n")
        first = scrape(base)
        deadline = time.monotonic() + 30
        while True:
            second = scrape(base)
            polls = ("edge_agent_device_polls_total", (("device", "press-1"),))
            published = ("edge_agent_samples_published_total", ())
            if second[polls] > first[polls] and second[published] > first[published]:
                break
            assert time.monotonic() < deadline, "metrics did not move"
            time.sleep(0.2)
        assert second[("edge_agent_mqtt_connected", ())] == 1.0
        assert second[("edge_agent_device_up", (("device", "oven"),))] == 1.0
        assert second[("edge_agent_samples_produced_total", ())] > 0
        assert second[("edge_agent_buffer_writable", ())] == 1.0
        assert second[("edge_agent_device_poll_duration_seconds", (("device", "oven"),))] > 0

        result = cli("status", str(config))
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["agent"]["id"] == "gw-http"
        assert status["agent"]["ready"] is True
        assert [d["name"] for d in status["devices"]] == ["press-1", "oven"]
        tags = {t["tag"]: t for t in status["devices"][0]["tags"]}
        assert tags["power_kw"]["quality"] == "good"
        assert tags["power_kw"]["unit"] == "kW"
        assert isinstance(tags["strokes"]["value"], int)
        assert agent.terminate() == 0
    assert "http.listening" in agent.log()


def test_status_without_a_running_agent_says_so(tmp_path: Path) -> None:
    config = sim_config(tmp_path, free_port(), free_port())
    result = cli("status", str(config))
    assert result.returncode == 1
    assert "cannot reach the agent at http://127.0.0.1:" in result.stderr
    assert "(is it running?)" in result.stderr


def test_status_needs_an_http_section(tmp_path: Path) -> None:
    config = sim_config(tmp_path, free_port(), free_port())
    config.write_text("\n".join(ln for ln in config.read_text().splitlines() if "http:" not in ln))
    result = cli("status", str(config))
    assert result.returncode == 2
    assert "no usable http: section" in result.stderr
