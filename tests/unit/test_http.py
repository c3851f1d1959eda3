"""The HTTP endpoint in-process: an Agent with a memory buffer, the fake publisher and a
Modbus device on a closed loopback port (so it is down, with a reason), served on a port
the OS picks."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from agent.buffer import BufferStats, Salvage
from agent.buffer.memory import MemoryBuffer
from agent.config import Config, parse_config
from agent.publish.fake import FakePublisher
from agent.runtime import Agent, RateHistory, drain_eta
from agent.schema import WireSample
from tests.support.broker import free_port


def make_config(tmp: Path, *, device_port: int) -> Config:
    return parse_config(
        f"""\
agent: {{id: gw-http, site: s1}}
buffer: {{kind: memory, path: {tmp / "b.db"}, max_bytes: 1048576}}
http: {{port: 0}}
devices:
  - name: plc-1
    protocol: modbus
    host: 127.0.0.1
    port: {device_port}
    interval_s: 0.05
    timeout_s: 0.2
    backoff_min_s: 0.05
    backoff_max_s: 0.1
    tags:
      - {{name: t1, address: 0, type: uint16, unit: rpm}}
"""
    )


class FailingBuffer(MemoryBuffer):
    """A buffer whose disk is full."""

    async def append(self, device: str, samples: Sequence[WireSample]) -> None:
        raise OSError(28, "No space left on device")


async def get(port: int, path: str, method: str = "GET", headers: str = "") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Agent]:
    config = make_config(tmp_path, device_port=free_port())
    agent = Agent(config, publisher=FakePublisher(), grace_s=0.5, rate_interval_s=0.05)
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(20):
        while agent.http_address is None or not agent.pollers or agent.pollers[0].status.polls < 3:
            await asyncio.sleep(0.02)
    yield agent
    agent.stop()
    await task


async def test_health_ready_and_status(running: Agent) -> None:
    assert running.http_address is not None
    port = running.http_address[1]
    assert await get(port, "/healthz") == (200, b"ok\n")
    code, body = await get(port, "/readyz")
    assert code == 200
    status = orjson.loads(body)
    assert status["agent"]["ready"] is True
    assert status["agent"]["id"] == "gw-http"
    assert status["mqtt"]["state"] == "connected"
    device = status["devices"][0]
    assert device["name"] == "plc-1"
    assert device["state"] == "down"
    assert device["reason"] == "connection refused"
    assert device["tags"][0]["tag"] == "t1"
    assert device["tags"][0]["quality"] == "bad"
    assert device["tags"][0]["unit"] == "rpm"
    code, body2 = await get(port, "/api/status")
    assert code == 200
    assert orjson.loads(body2)["devices"][0]["name"] == "plc-1"


async def test_metrics_are_prometheus_text_with_the_figures(running: Agent) -> None:
    assert running.http_address is not None
    code, body = await get(running.http_address[1], "/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in (
        "edge_agent_device_polls",
        "edge_agent_device_read_errors",
        "edge_agent_device_poll_duration_seconds",
        "edge_agent_device_up",
        "edge_agent_samples_produced",
        "edge_agent_samples_published",
        "edge_agent_samples_dropped",
        "edge_agent_buffer_bytes",
        "edge_agent_buffer_records",
        "edge_agent_buffer_oldest_age_seconds",
        "edge_agent_mqtt_connected",
        "edge_agent_publish_latency_seconds",
    ):
        assert name in families, name
    polls = {s.labels["device"]: s.value for s in families["edge_agent_device_polls"].samples}
    assert polls["plc-1"] >= 3
    errors = families["edge_agent_device_read_errors"].samples
    assert any(s.labels == {"device": "plc-1", "reason": "connection refused"} for s in errors)
    up = families["edge_agent_device_up"].samples
    assert [s.value for s in up] == [0.0]
    assert families["edge_agent_mqtt_connected"].samples[0].value == 1.0


async def test_errors_and_refusals(running: Agent) -> None:
    assert running.http_address is not None
    port = running.http_address[1]
    assert (await get(port, "/nope"))[0] == 404
    assert (await get(port, "/metrics", method="POST"))[0] == 405
    assert (await get(port, "/api/reload"))[0] == 405
    code, _ = await get(port, "/api/reload", "POST", "Origin: http://evil.example\r\n")
    assert code == 403
    code, body = await get(port, "/", "GET")
    assert code == 200
    assert b"<title>edge-agent status</title>" in body
    # No config file: a reload through HTTP says so and changes nothing.
    code, body = await get(port, "/api/reload", "POST")
    assert code == 400
    assert orjson.loads(body)["problems"] == ["no config file to reload from"]


async def test_a_failing_buffer_makes_the_agent_unready(tmp_path: Path) -> None:
    config = make_config(tmp_path, device_port=free_port())
    buffer = FailingBuffer(config.buffer)
    agent = Agent(config, publisher=FakePublisher(), buffer=buffer, grace_s=0.5)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while agent.writer.retries < 2 or agent.http_address is None:
                await asyncio.sleep(0.02)
        code, body = await get(agent.http_address[1], "/readyz")
        assert code == 503
        status = orjson.loads(body)
        assert status["agent"]["not_ready"] == [
            "buffer not writable: [Errno 28] No space left on device"
        ]
        # The polls are held and tried again, not dropped: the pollers wait behind them.
        assert status["samples"]["dropped"]["buffer_error"] == 0
        _, metrics = await get(agent.http_address[1], "/metrics")
        assert b'edge_agent_samples_dropped_total{reason="buffer_error"}' in metrics
        assert b"edge_agent_ready 0.0" in metrics
    finally:
        agent.stop()
        await task


async def test_a_taken_port_fails_the_start_with_a_clear_message(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = make_config(tmp_path, device_port=free_port())
        config = config.model_copy(
            update={"http": config.http.model_copy(update={"port": port})}  # type: ignore[union-attr]
        )
        agent = Agent(config, publisher=FakePublisher(), grace_s=0.5)
        with pytest.raises(OSError, match=f"http: cannot listen on 127.0.0.1:{port}"):
            await agent.run()
    finally:
        server.close()
        await server.wait_closed()


def test_rate_history_gives_per_second_rates() -> None:
    history = RateHistory(interval_s=5, points=3)
    history.points.extend([(100.0, 0, 0, 0), (105.0, 50, 40, 10), (110.0, 100, 100, 20)])
    assert history.rates() == [
        {"t": 105.0, "produced_per_s": 10.0, "delivered_per_s": 8.0, "records_per_s": 2.0},
        {"t": 110.0, "produced_per_s": 10.0, "delivered_per_s": 12.0, "records_per_s": 2.0},
    ]
    history.points.append((115.0, 100, 100, 20))
    assert len(history.points) == 3  # bounded


@pytest.mark.parametrize(
    ("left", "rate", "eta"), [(1000, 100.0, 10.0), (1000, 0.0, None), (0, 5.0, 0.0)]
)
def test_drain_eta(left: int, rate: float, eta: float | None) -> None:
    assert drain_eta(left, rate) == eta


async def test_a_backlog_drain_is_logged_with_progress(tmp_path: Path) -> None:
    config = make_config(tmp_path, device_port=free_port())
    device = config.devices[0].model_copy(update={"enabled": False})
    config = config.model_copy(update={"devices": [device]})
    buffer = MemoryBuffer(config.buffer)
    await buffer.open()
    now = datetime.now(UTC)
    for seq in range(1, 301):
        sample: WireSample = {
            "device": "plc-1", "tag": "t1", "value": seq, "quality": "good", "reason": None,
            "code": None, "ts_source": None, "ts_agent": now, "unit": None, "seq": seq,
        }  # fmt: skip
        await buffer.append("plc-1", [sample])
    publisher = FakePublisher(connect_on_start=False)
    agent = Agent(config, publisher=publisher, buffer=buffer, progress_interval_s=0.05)
    with capture_logs() as logs:
        task = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(20):
                while not any(e["event"] == "buffer.drain.progress" for e in logs):
                    await asyncio.sleep(0.02)
                publisher.set_connected(True)
                while not any(e["event"] == "buffer.drain.done" for e in logs):
                    await asyncio.sleep(0.02)
        finally:
            agent.stop()
            await task
    started = next(e for e in logs if e["event"] == "buffer.drain.started")
    assert started["records"] == 300
    progress = next(e for e in logs if e["event"] == "buffer.drain.progress")
    assert progress["records_left"] == 300
    assert progress["eta_s"] is None  # nothing moves while the broker is away
    assert progress["mqtt"] == "disconnected"
    done = next(e for e in logs if e["event"] == "buffer.drain.done")
    assert done["records_sent"] >= 200


class SalvagedBuffer(MemoryBuffer):
    """A buffer that salvaged a damaged file once, losing 7 samples as a corrupt gap."""

    def stats(self) -> BufferStats:
        st = super().stats()
        salvage = Salvage(
            at=1.0,
            at_start=False,
            moved_to="/var/lib/edge-agent/buffer.db.damaged-20261201T080000Z",
            error="database disk image is malformed",
            recovered_records=3,
            recovered_samples=30,
            lost_samples=7,
            lost_seq_ranges=("41-47",),
        )
        return dataclasses.replace(
            st,
            damaged_files=1,
            last_salvage=salvage,
            dropped_samples=7,
            dropped_by_reason={"corrupt": 7},
            lease_ok=False,
        )


async def test_a_salvaged_buffer_and_its_loss_are_shown(tmp_path: Path) -> None:
    config = make_config(tmp_path, device_port=free_port())
    agent = Agent(config, publisher=FakePublisher(), buffer=SalvagedBuffer(config.buffer))
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while agent.http_address is None:
                await asyncio.sleep(0.02)
        _, body = await get(agent.http_address[1], "/api/status")
        status = orjson.loads(body)
        assert status["buffer"]["damaged_files"] == 1
        assert status["buffer"]["last_salvage"]["lost_seq_ranges"] == ["41-47"]
        assert status["buffer"]["lease_ok"] is False
        assert len(status["buffer"]["epoch"]) == 32
        assert status["samples"]["dropped"]["by_reason"] == {"corrupt": 7}
        _, metrics = await get(agent.http_address[1], "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(metrics.decode())}
        dropped = {
            s.labels["reason"]: s.value for s in families["edge_agent_samples_dropped"].samples
        }
        assert dropped["corrupt"] == 7.0
        assert families["edge_agent_buffer_damaged_files"].samples[0].value == 1.0
        assert families["edge_agent_buffer_lease_ok"].samples[0].value == 0.0
    finally:
        agent.stop()
        await task


async def test_dead_letters_and_device_backoff_are_shown(tmp_path: Path) -> None:
    """A record the broker refuses for good (0x87) is set aside at once; /api/status and
    /metrics say so, by reason."""
    config = parse_config(
        f"""\
agent: {{id: gw-http}}
buffer: {{kind: memory, path: {tmp_path / "b.db"}, max_bytes: 1048576}}
http: {{port: 0}}
devices:
  - name: plc-1
    protocol: modbus
    host: 127.0.0.1
    port: {free_port()}
    interval_s: 0.05
    timeout_s: 0.2
    backoff_min_s: 0.05
    backoff_max_s: 0.1
    down_report_interval_s: 0.05
    tags:
      - {{name: t1, address: 0, type: uint16}}
"""
    )
    publisher = FakePublisher()
    publisher.fail_next(5, "Not authorized", code=0x87)  # status messages share the link
    agent = Agent(config, publisher=publisher, grace_s=0.5)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while agent.forwarder is None or agent.forwarder.stats.dead_lettered_records == 0:
                await asyncio.sleep(0.02)
        assert agent.http_address is not None
        _, body = await get(agent.http_address[1], "/api/status")
        dead = orjson.loads(body)["dead_letters"]
        assert dead["records"] >= 1
        assert sum(dead["by_reason"].values()) == dead["records"]
        assert dead["store"]["entries"] >= 1
        _, metrics = await get(agent.http_address[1], "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(metrics.decode())}
        assert sum(s.value for s in families["edge_agent_dead_lettered_records"].samples) >= 1
        assert families["edge_agent_dead_letter_bytes"].samples[0].value > 0
    finally:
        agent.stop()
        await task
