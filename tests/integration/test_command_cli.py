"""`edge-agent write` as a process: against the Modbus simulator (`--simulate`), exit codes
and output, and refused while an agent runs with the same audit log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.test_commands_mqtt import config_text
from tests.support.agent_proc import AgentProcess, cli
from tests.support.broker import free_port

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
    assert out.stderr.endswith("refused (above_max): press.temp_sp: 301 is above max 300\n")
    out = cli("write", str(path), "press", "recipe", '"R-1234567"', "--simulate")
    assert out.returncode == 3  # 9 characters do not fit 4 registers: the driver refuses
    assert "refused (driver_refused): press.recipe:" in out.stderr
    records = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(records) == 5  # accepted + done, refused, accepted + driver_refused
    assert '"channel":"cli"' in records[0]


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
