"""Helpers for tests of the agent's HTTP endpoint (metrics, health, status page)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.agent_proc import AgentProcess


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
