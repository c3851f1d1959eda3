"""The Agent class in-process against a real simulator and a real broker, where a test
needs to look inside (the simulator's request counter, the pollers' status)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import Config, parse_config
from agent.runtime import Agent
from agent.simulate import simulators
from drivers.modbus.config import ModbusDevice
from drivers.modbus.simulator import ModbusSimulator
from tests.support.agent_proc import cli, samples_of
from tests.support.broker import MosquittoBroker
from tests.support.payloads import batches, decoded
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def wide_config(tmp: Path, port: int, registers: int = 200, layout: str | None = None) -> Config:
    tags = "\n".join(
        f"      - {{name: r{i:03d}, address: {i}, type: uint16}}" for i in range(registers)
    )
    return parse_config(
        f"""\
agent: {{id: gw}}
mqtt: {{port: {port}{f", layout: {layout}" if layout else ""}}}
buffer: {{path: {tmp / "buffer.db"}}}
devices:
  - name: wide
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: 0.1
    tags:
{tags}
"""
    )


async def test_200_registers_take_two_requests_per_poll(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = wide_config(tmp_path, broker.port)
    assert isinstance(config.devices[0], ModbusDevice)
    async with ModbusSimulator([config.devices[0]]) as sim:
        _, port = sim.endpoints["wide"]
        device = config.devices[0].model_copy(update={"port": port})
        agent = Agent(config.model_copy(update={"devices": [device]}), grace_s=2)
        task = asyncio.create_task(agent.run())
        async with asyncio.timeout(30):
            while not agent.pollers or agent.pollers[0].status.polls < 10:
                await asyncio.sleep(0.05)
        agent.stop()
        await task
        status = agent.pollers[0].status
        assert status.failed_polls == 0
        # The poll running when the agent stopped may have been cut after 0, 1 or 2 requests.
        assert 2 * (status.polls - 1) <= sim.request_count("wide") <= 2 * status.polls
    plan = tmp_path / "wide.yaml"
    plan.write_text(
        "agent: {id: gw}\ndevices:\n  - name: wide\n    protocol: modbus\n    host: h\n"
        "    tags:\n"
        + "\n".join(f"      - {{name: r{i}, address: {i}}}" for i in range(200))
        + "\n"
    )
    out = cli("plan", str(plan))
    assert out.returncode == 0, out.stderr
    assert "2 requests per poll" in out.stdout
    assert "holding 0..124 (125 registers, 125 tags)" in out.stdout
    assert "holding 125..199 (75 registers, 75 tags)" in out.stdout


async def test_published_samples_validate_and_agent_stops_cleanly(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = wide_config(tmp_path, broker.port, registers=10)
    with Subscriber("127.0.0.1", broker.port, "edge/#") as sub:
        async with simulators(config) as simulated:
            agent = Agent(simulated, grace_s=5)
            task = asyncio.create_task(agent.run())
            await asyncio.to_thread(sub.wait_count, 5, 30.0)
            agent.stop()
            await task
        stats = agent.buffer.stats()
    batches(m.payload for m in sub.messages())  # every message is a valid batch
    assert stats.records == 0  # everything produced was delivered within the grace period
    # At least once: a publish cut by the stop is sent again by the drain (same seq).
    received = {int(s["seq"]) for s in samples_of(sub.messages())}  # type: ignore[call-overload]
    assert received == set(range(1, agent.status.samples_produced + 1))


@pytest.mark.parametrize("layout", [None, "lean", "compact", "device"])
async def test_every_layout_end_to_end_decodes_to_every_sample_produced(
    tmp_path: Path, broker: MosquittoBroker, layout: str | None
) -> None:
    """The real agent, broker and simulator in each JSON layout: the reference decoder
    reads every sample produced (compact: with the retained metadata, subscribed to as a
    consumer would). A config that does not set the layout says so once in the log."""
    config = wide_config(tmp_path, broker.port, registers=10, layout=layout)
    with Subscriber("127.0.0.1", broker.port, "#") as sub, capture_logs() as logs:
        async with simulators(config) as simulated:
            agent = Agent(simulated, grace_s=5)
            task = asyncio.create_task(agent.run())
            await asyncio.to_thread(sub.wait_count, 8, 30.0)
            agent.stop()
            await task
    got = decoded(m.payload for m in sub.messages())
    assert {d.schema for d in got} == {
        {None: "edge-agent/batch/2", "lean": "edge-agent/batch/2"}.get(
            layout, f"edge-agent/{'compact/1' if layout == 'compact' else 'batch/1'}"
        )
    }
    received = {int(s["seq"]) for d in got for s in d.samples}
    assert received == set(range(1, agent.status.samples_produced + 1))
    assert all(len(s) >= 10 and s["device"] == "wide" for d in got for s in d.samples)
    defaults = [e for e in logs if e["event"] == "mqtt.layout.default"]
    assert len(defaults) == (1 if layout is None else 0)
