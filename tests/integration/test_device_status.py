"""Retained device status on the real agent: `down` with the reason while a PLC is
unreachable, `up` again once it answers — seen by a subscriber that arrives later."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from agent.config import parse_config
from agent.runtime import Agent
from tests.support.agent_proc import AgentProcess, wait_until
from tests.support.broker import MosquittoBroker, free_port
from tests.support.proxy import FaultProxy
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration


def status_of(sub: Subscriber, device: str) -> dict[str, object] | None:
    found = [m for m in sub.messages() if m.topic == f"edge-status/gw-st/{device}"]
    return orjson.loads(found[-1].payload) if found else None


def test_device_down_then_up_is_retained(tmp_path: Path, broker: MosquittoBroker) -> None:
    served = tmp_path / "plc.yaml"
    served.write_text(
        f"agent: {{id: sim}}\nbuffer: {{path: {tmp_path / 's.db'}}}\ndevices:\n"
        "  - {name: plc, protocol: modbus, host: 127.0.0.1, port: 0, "
        "tags: [{name: t, address: 0}]}\n"
    )
    with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
        sim_port = int(sim.read_line(60).split("\t")[2].rsplit(":", 1)[1])
        with FaultProxy("127.0.0.1", sim_port) as proxy:
            proxy.set_mode("cut")
            config = tmp_path / "agent.yaml"
            config.write_text(
                f"""\
agent: {{id: gw-st}}
mqtt: {{port: {broker.port}, reconnect_min_s: 0.2, reconnect_max_s: 1}}
buffer: {{path: {tmp_path / "b.db"}}}
devices:
  - name: plc
    protocol: modbus
    host: 127.0.0.1
    port: {proxy.port}
    interval_s: 0.2
    backoff_min_s: 0.2
    backoff_max_s: 0.5
    tags: [{{name: t, address: 0}}]
  - name: nobody
    protocol: modbus
    host: 127.0.0.1
    port: {free_port()}
    interval_s: 0.2
    tags: [{{name: t, address: 0}}]
"""
            )
            with AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent:
                wait_until(lambda: '"device.down"' in agent.log(), 30, "device down", agent)
                time.sleep(1)
                with Subscriber("127.0.0.1", broker.port, "edge-status/#") as late:
                    wait_until(lambda: status_of(late, "plc") is not None, 20, "retained status")
                    down = status_of(late, "plc")
                    assert down is not None
                    assert down["state"] == "down"
                    assert down["reason"] == "connection lost"
                    assert status_of(late, "nobody") is not None
                    assert status_of(late, "nobody")["reason"] == "connection refused"  # type: ignore[index]
                    proxy.set_mode("pass")
                    wait_until(
                        lambda: (status_of(late, "plc") or {}).get("state") == "up",
                        30,
                        "device up",
                        agent,
                    )
                assert agent.terminate() == 0


async def test_reload_publishes_the_new_config_hash(
    tmp_path: Path, broker: MosquittoBroker
) -> None:

    def config(devices: int) -> str:
        lines = "".join(
            f"  - {{name: d{i}, protocol: modbus, host: 127.0.0.1, port: {free_port()}, "
            "tags: [{name: t, address: 0}]}\n"
            for i in range(devices)
        )
        return (
            f"agent: {{id: gw-st}}\nmqtt: {{port: {broker.port}}}\n"
            f"buffer: {{path: {tmp_path / 'b.db'}}}\ndevices:\n{lines}"
        )

    def hashes(messages: list[Received]) -> list[str]:
        return [
            str(orjson.loads(m.payload)["config_hash"])
            for m in messages
            if m.topic == "edge-status/gw-st" and b'"online"' in m.payload
        ]

    with Subscriber("127.0.0.1", broker.port, "edge-status/#") as sub:
        agent = Agent(parse_config(config(1)), grace_s=1)
        task = asyncio.create_task(agent.run())
        await asyncio.to_thread(sub.wait_for, lambda ms: bool(hashes(ms)), 20.0)
        result = await agent.reload(parse_config(config(2)))
        assert result.ok
        assert result.started == ["d1"]
        await asyncio.to_thread(sub.wait_for, lambda ms: len(set(hashes(ms))) == 2, 20.0)
        agent.stop()
        await task


async def test_retained_statuses_are_complete_beyond_receive_maximum_and_cleared_on_removal(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """30 devices (mosquitto announces Receive Maximum 20): a late subscriber sees every
    device's retained status, also after a broker restart that lost them all; a reload
    that removes 10 clears theirs."""

    def config(devices: range) -> str:
        lines = "".join(
            f"  - {{name: d{i}, protocol: modbus, host: 127.0.0.1, port: {PORTS[i]}, "
            "tags: [{name: t, address: 0}]}\n"
            for i in devices
        )
        return (
            f"agent: {{id: gw-many}}\nmqtt: {{port: {broker.port}}}\n"
            f"buffer: {{path: {tmp_path / 'b.db'}}}\ndevices:\n{lines}"
        )

    def device_statuses(messages: list[Received]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for m in messages:
            if m.topic.startswith("edge-status/gw-many/"):
                out[m.topic.rsplit("/", 1)[1]] = m.payload
        return {d: p for d, p in out.items() if p}

    PORTS = [free_port() for _ in range(30)]
    agent = Agent(parse_config(config(range(30))), grace_s=1)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(30):
            while not (
                agent.status_sync is not None
                and agent.status_sync.delivered >= 30
                and agent.status_sync.pending == 0
            ):
                await asyncio.sleep(0.05)
        with Subscriber("127.0.0.1", broker.port, "edge-status/#") as late:
            await asyncio.to_thread(late.wait_for, lambda ms: len(device_statuses(ms)) == 30, 20.0)
        statuses = device_statuses(late.messages())
        assert sorted(statuses) == sorted(f"d{i}" for i in range(30))
        assert all(orjson.loads(p)["state"] == "down" for p in statuses.values())
        # A broker restart without persistence loses every retained message: after the
        # reconnect all 30 are sent again (a birth alone is cut to the broker's window).
        delivered = agent.status_sync.delivered
        broker.restart()
        async with asyncio.timeout(30):
            while agent.status_sync.delivered < delivered + 30 or agent.status_sync.pending:
                await asyncio.sleep(0.05)
        with Subscriber("127.0.0.1", broker.port, "edge-status/#") as again:
            await asyncio.to_thread(again.wait_for, lambda ms: len(device_statuses(ms)) == 30, 20.0)
        result = await agent.reload(parse_config(config(range(20))))
        assert result.ok
        assert result.stopped == [f"d{i}" for i in range(20, 30)]
        async with asyncio.timeout(30):
            while agent.status_sync.pending:
                await asyncio.sleep(0.05)
        with Subscriber("127.0.0.1", broker.port, "edge-status/#") as later:
            await asyncio.to_thread(later.wait_for, lambda ms: len(device_statuses(ms)) == 20, 20.0)
            await asyncio.sleep(0.5)  # a retained message for a removed device would be here
            assert sorted(device_statuses(later.messages())) == sorted(f"d{i}" for i in range(20))
    finally:
        agent.stop()
        await task
