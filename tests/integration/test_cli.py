"""CLI outcomes a user relies on: a runtime failure is one clear line and exit 1, and
`schema` writes the published schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, cli, wait_until
from tests.support.broker import free_port

pytestmark = pytest.mark.integration


def test_second_agent_on_the_same_buffer_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"agent: {{id: gw}}\nmqtt: {{port: {free_port()}}}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\ndevices:\n"
        f"  - {{name: plc, protocol: modbus, host: 127.0.0.1, port: {free_port()}, "
        "tags: [{name: t, address: 0}]}\n"
    )
    with AgentProcess(tmp_path / "first.log", "run", str(config)) as first:
        wait_until(lambda: "agent.started" in first.log(), 30, "first agent", first)
        second = cli("run", str(config), timeout_s=30)
        assert first.terminate() == 0
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    failed = [json.loads(line) for line in second.stderr.splitlines() if "agent.failed" in line]
    assert len(failed) == 1
    assert "in use" in failed[0]["error"]


def test_schema_command_writes_the_shipped_schemas(tmp_path: Path) -> None:
    out = cli("schema", "--out", str(tmp_path / "s"), "--reference", str(tmp_path / "ref.md"))
    assert out.returncode == 0, out.stderr
    root = Path(__file__).resolve().parents[2]
    for name in ("config.schema.json", "batch.schema.json", "sample.schema.json"):
        assert (tmp_path / "s" / name).read_text() == (
            root / "agent" / "schemas" / name
        ).read_text()
    assert (tmp_path / "ref.md").read_text() == (root / "docs" / "configuration.md").read_text()


def test_a_stopped_agent_exits_even_if_a_thread_hangs() -> None:
    import subprocess
    import sys

    code = (
        "import threading, time\n"
        "from agent.cli import _exit_watchdog\n"
        "from agent.logs import setup_logging\n"
        "setup_logging()\n"
        "threading.Thread(target=lambda: time.sleep(60)).start()\n"  # never-ending, non-daemon
        "_exit_watchdog(3, limit_s=0.5)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 3
    assert "agent.exit.stuck" in result.stderr
    assert "Thread" in result.stderr  # the stacks, for whoever finds out why


def test_a_device_whose_plan_cannot_work_is_a_config_error(tmp_path: Path) -> None:
    # The loader makes the plan (validate = run): exit 2 with the line, nothing started.
    # (The runtime's own guard, for configs built without the loader, is a unit test.)
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"agent: {{id: gw}}\nmqtt: {{port: {free_port()}}}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\ndevices:\n"
        f"  - {{name: plc, protocol: modbus, host: 127.0.0.1, port: {free_port()}, "
        "max_registers_per_request: 2, tags: [{name: t, address: 0, type: float64}]}\n"
    )
    result = cli("run", str(config), timeout_s=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{config}:5 devices[0].tags[0].type: tag 't': a float64 of 4 registers" in (
        result.stderr
    )
    assert not (tmp_path / "buffer.db").exists()
