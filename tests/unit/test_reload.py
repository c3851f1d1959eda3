"""Agent.reload in-process: only changed devices restart, the buffer is untouched, an
invalid file or a change outside `devices` changes nothing. Devices point at closed
loopback ports (down, which is fine: a reload is about which pollers run)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.buffer.memory import MemoryBuffer
from agent.config import load_config
from agent.publish.fake import FakePublisher
from agent.runtime import Agent
from tests.support.broker import free_port

DEVICE = """\
  - name: {name}
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    interval_s: {interval}
    timeout_s: 0.2
    backoff_min_s: 0.05
    backoff_max_s: 0.1
    tags:
      - {{name: t1, address: 0, type: uint16}}
"""


def write_config(path: Path, devices: dict[str, float], *, mqtt_port: int = 1883) -> None:
    body = "".join(
        DEVICE.format(name=n, port=PORTS.setdefault(n, free_port()), interval=i)
        for n, i in devices.items()
    )
    path.write_text(
        f"agent: {{id: gw}}\nmqtt: {{port: {mqtt_port}}}\n"
        f"buffer: {{kind: memory, path: {path.parent / 'b.db'}}}\ndevices:\n{body}"
    )


PORTS: dict[str, int] = {}


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    path = tmp_path / "agent.yaml"
    write_config(path, {"a": 0.05, "b": 0.05, "c": 0.05})
    config = load_config(path)
    buffer = MemoryBuffer(config.buffer)
    agent = Agent(config, publisher=FakePublisher(), buffer=buffer, config_path=path, grace_s=0.2)
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(20):
        # Each device is down (a closed port) and reports it once: one sample each.
        while len(agent.devices) < 3 or agent.status.samples_produced < 3:
            await asyncio.sleep(0.02)
    yield agent
    agent.stop()
    await task


async def test_only_changed_devices_restart(agent: Agent) -> None:
    assert agent.config_path is not None
    before = {n: r.poller for n, r in agent.devices.items()}
    buffer = agent.buffer
    seq_before = buffer.last_seq()
    write_config(agent.config_path, {"a": 0.05, "b": 0.5, "d": 0.05})  # b changed, c gone
    with capture_logs() as logs:
        result = await agent.reload()
    assert result.ok
    assert (result.started, result.stopped, result.restarted, result.unchanged) == (
        ["d"],
        ["c"],
        ["b"],
        ["a"],
    )
    assert list(agent.devices) == ["a", "b", "d"]
    assert agent.devices["a"].poller is before["a"]  # untouched
    assert agent.devices["b"].poller is not before["b"]
    assert agent.devices["b"].poller.device.interval_s == 0.5
    assert before["c"].status.polls > 0
    assert "c" not in agent.latest
    assert agent.buffer is buffer
    assert buffer.last_seq() >= seq_before  # same buffer, seq goes on
    event = next(e for e in logs if e["event"] == "config.reloaded")
    assert event["restarted"] == ["b"]
    async with asyncio.timeout(20):
        while agent.devices["d"].poller.status.polls == 0:
            await asyncio.sleep(0.02)
    assert agent.status.reloads_ok == 1


async def test_an_invalid_file_changes_nothing(agent: Agent) -> None:
    assert agent.config_path is not None
    before = {n: r.poller for n, r in agent.devices.items()}
    config = agent.config
    agent.config_path.write_text(agent.config_path.read_text().replace("interval_s", "intervall_s"))
    with capture_logs() as logs:
        result = await agent.reload()
    assert not result.ok
    assert any("unknown key 'intervall_s'" in p for p in result.problems)
    assert agent.config is config
    assert {n: r.poller for n, r in agent.devices.items()} == before
    assert all(not r.task.done() for r in agent.devices.values())
    event = next(e for e in logs if e["event"] == "config.reload.failed")
    assert event["log_level"] == "error"
    assert event["problems"] == result.problems
    assert agent.status.reloads_failed == 1
    assert agent.status.last_reload_error == result.problems


async def test_a_changed_mqtt_section_needs_a_restart(agent: Agent) -> None:
    assert agent.config_path is not None
    before = {n: r.poller for n, r in agent.devices.items()}
    write_config(agent.config_path, {"a": 0.05, "b": 0.5, "c": 0.05}, mqtt_port=1884)
    result = await agent.reload()
    assert not result.ok
    assert result.problems == [
        "section 'mqtt' changed: this needs a restart of the agent "
        "(a reload only applies changes to devices)"
    ]
    assert {n: r.poller for n, r in agent.devices.items()} == before
    assert agent.devices["b"].poller.device.interval_s == 0.05


async def test_reload_when_stopped_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    write_config(path, {"a": 0.05})
    agent = Agent(load_config(path), publisher=FakePublisher(), config_path=path)
    result = await agent.reload()
    assert not result.ok
    assert result.problems == ["the agent is not running"]


def test_a_changed_link_needs_a_restart() -> None:
    """Units share one open serial port per link: a changed line (baud, port) cannot be
    swapped under them by a reload."""
    from agent.config import parse_config
    from agent.runtime.reload import plan_reload

    def config(baud: int) -> str:
        return f"""\
agent: {{id: gw}}
links:
  line1: {{type: serial, port: /dev/ttyUSB0, baud: {baud}}}
devices:
  - name: meter
    protocol: modbus
    link: line1
    unit_id: 1
    tags:
      - {{name: v, address: 0}}
"""

    old, new = parse_config(config(19200)), parse_config(config(9600))
    result = plan_reload(old, new, {"meter"})
    assert not result.ok
    assert result.problems == [
        "section 'links' changed: this needs a restart of the agent "
        "(a reload only applies changes to devices)"
    ]
    assert plan_reload(old, parse_config(config(19200)), {"meter"}).ok
