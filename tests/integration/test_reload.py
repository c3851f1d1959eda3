"""Config reload on the real agent process: `edge-agent reload` (HTTP) and SIGHUP restart
only the changed devices; an invalid file is refused and the agent keeps running."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, cli
from tests.support.broker import MosquittoBroker, free_port
from tests.support.http import http_get, sim_config, wait_ready

pytestmark = pytest.mark.integration


def wait_log(agent: AgentProcess, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in agent.log():
        assert time.monotonic() < deadline, f"{text!r} not logged; log:\n{agent.log()}"
        time.sleep(0.1)
    return agent.log()


def test_reload_restarts_only_changed_devices(tmp_path: Path, broker: MosquittoBroker) -> None:
    http_port = free_port()
    config = sim_config(tmp_path, broker.port, http_port)
    base = f"http://127.0.0.1:{http_port}"
    original = config.read_text()
    with AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent:
        wait_ready(base, agent)

        # The oven polls at a new interval: only it restarts (simulator mode keeps its port).
        config.write_text(
            original.replace("interval_s: 0.2", "interval_s: 0.3", 2).replace(
                "interval_s: 0.3", "interval_s: 0.2", 1
            )
        )
        result = cli("reload", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["restarted: oven", "reloaded (1 devices unchanged)"]
        status = json.loads(http_get(f"{base}/api/status")[1])
        assert status["agent"]["reloads_ok"] == 1
        press = status["devices"][0]
        assert press["name"] == "press-1"
        assert press["connects"] == 1  # never restarted

        # An invalid file: refused with every problem, nothing changes, polling goes on.
        config.write_text(original.replace("interval_s: 0.2", "interval_s: -1", 1))
        result = cli("reload", str(config))
        assert result.returncode == 2
        assert "reload refused; the running config stays in effect:" in result.stderr
        assert "devices[0].interval_s" in result.stderr
        polls = json.loads(http_get(f"{base}/api/status")[1])["devices"][0]["polls"]
        deadline = time.monotonic() + 30
        while json.loads(http_get(f"{base}/api/status")[1])["devices"][0]["polls"] <= polls:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        # SIGHUP with the oven removed.
        head, _, _ = original.partition("  - name: oven")
        config.write_text(head)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        log = wait_log(agent, '"stopped": ["oven"]')
        assert "config.reload.failed" in log  # from the invalid file above
        status = json.loads(http_get(f"{base}/api/status")[1])
        assert [d["name"] for d in status["devices"]] == ["press-1"]
        assert agent.terminate() == 0
