"""The real agent process in simulator mode with its HTTP endpoint on: /metrics figures
move, /healthz and /readyz answer, and `edge-agent status` prints the same JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent_proc import AgentProcess, cli
from tests.support.broker import MosquittoBroker, free_port
from tests.support.http import http_get, sim_config, wait_ready

pytestmark = pytest.mark.integration


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
