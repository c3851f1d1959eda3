"""The Agent under supervision, in-process (memory buffer, fake publisher, a Modbus device on
a closed loopback port that reports bad quality at a short heartbeat): a failing forwarder
or writer is restarted and delivery resumes; one that keeps failing makes run() raise;
a stalled forwarder fails /healthz; a degraded buffer is shown; a reload that cannot build
a device changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from agent.buffer import BufferStats, Record
from agent.buffer.memory import MemoryBuffer
from agent.config import Config, parse_config
from agent.publish import Message
from agent.publish.fake import FakePublisher
from agent.runtime import Agent, DeviceBuildError, SupervisionPolicy, TaskFailed
from agent.runtime.supervisor import Probe, Stall
from agent.schema import WireSample
from agent.yamlsafe import load_yaml
from tests.support.broker import free_port
from tests.support.faults import FaultPlan, Faulty, Hang

FAST = SupervisionPolicy(max_failures=3, window_s=60.0, backoff_min_s=0.01, backoff_max_s=0.02)


def config_text(tmp: Path, *, http: bool = False, stall_s: float = 60.0, extra: str = "") -> str:
    return f"""\
agent: {{id: gw-sup}}
buffer: {{kind: memory, path: {tmp / "b.db"}, max_bytes: 1048576}}
mqtt: {{publish_timeout_s: 0.05}}
supervision: {{stall_s: {stall_s}}}
{"http: {port: 0}" if http else ""}
devices:
  - name: plc-1
    protocol: modbus
    host: 127.0.0.1
    port: {free_port()}
    interval_s: 0.02
    timeout_s: 0.2
    backoff_min_s: 0.05
    backoff_max_s: 0.1
    down_report_interval_s: 0.02
    tags:
      - {{name: t1, address: 0, type: uint16}}
{extra}"""


def make_config(tmp: Path, **kw: object) -> Config:
    return parse_config(config_text(tmp, **kw))  # type: ignore[arg-type]


class FlakyTake(MemoryBuffer):
    """take() raises `fail` times, then works."""

    def __init__(self, config: object, fail: int) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.fail = fail

    async def take(self, max_records: int, after_id: int = 0) -> list[Record]:
        if self.fail > 0:
            self.fail -= 1
            raise OSError(5, "Input/output error")
        return await super().take(max_records, after_id)


class BrokenAppendMany(MemoryBuffer):
    """append_many returns a wrong number of results `fail` times (a bug, not an error)."""

    def __init__(self, config: object, fail: int) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.fail = fail

    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]:
        if self.fail > 0:
            self.fail -= 1
            return []
        out: list[Exception | None] = []
        for device, samples in batches:
            try:
                await self.append(device, samples)
                out.append(None)
            except Exception as exc:
                out.append(exc)
        return out


class DegradedBuffer(MemoryBuffer):
    def stats(self) -> BufferStats:
        s = super().stats()
        return BufferStats(
            **{
                **{f: getattr(s, f) for f in BufferStats.__dataclass_fields__},
                "degraded": True,
                "degraded_reason": "disk I/O error; holding records in memory",
                "memory_records": 3,
            }
        )


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def wait_for(cond: object, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_forwarder_that_fails_once_is_restarted_and_delivery_resumes(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    buffer = FlakyTake(config.buffer, fail=1)
    publisher = FakePublisher()
    agent = Agent(config, publisher=publisher, buffer=buffer, grace_s=0.2, supervision=FAST)
    with capture_logs() as logs:
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: len(publisher.published) >= 3)
        finally:
            agent.stop()
            await task
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert [(e["task"], e["action"]) for e in failed] == [("forwarder", "restarting")]
    assert agent.supervisor.states["forwarder"].restarts == 1


async def test_a_forwarder_that_keeps_failing_stops_the_agent(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    buffer = FlakyTake(config.buffer, fail=10**6)
    agent = Agent(config, publisher=FakePublisher(), buffer=buffer, grace_s=0.2, supervision=FAST)
    with capture_logs() as logs:
        async with asyncio.timeout(20):
            with pytest.raises(TaskFailed) as info:
                await agent.run()
    assert info.value.task == "forwarder"
    assert info.value.error_text == "OSError: [Errno 5] Input/output error"
    events = [e["event"] for e in logs]
    assert events.count("task.failed") == 3
    assert events[-1] == "agent.stopped"  # stopped in order: inputs, writer, buffer closed
    stopping = next(e for e in logs if e["event"] == "agent.stopping")
    assert stopping["reason"] == "task failed"


async def test_a_writer_bug_is_restarted_counted_and_later_polls_are_stored(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    buffer = BrokenAppendMany(config.buffer, fail=1)
    agent = Agent(config, publisher=FakePublisher(), buffer=buffer, grace_s=0.2, supervision=FAST)
    with capture_logs() as logs:
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.status.samples_produced >= 3)
        finally:
            agent.stop()
            await task
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert [e["task"] for e in failed] == ["buffer-writer"]
    assert failed[0]["error"] == "RuntimeError: the buffer returned 0 results for 1 batches"
    assert agent.status.samples_dropped_on_error >= 1  # the polls in hand: counted, not lost


async def test_a_stalled_forwarder_fails_healthz_is_restarted_and_recovers(
    tmp_path: Path,
) -> None:
    """The broker stops acknowledging (one publish hangs): the forwarder is stalled,
    /healthz, /readyz and /metrics say so, the supervisor restarts it, and the next round
    delivers: healthy again."""
    config = make_config(tmp_path, http=True, stall_s=0.5)
    # The forwarder's second round hangs (the device-status task shares the publisher).
    plan = FaultPlan().at("publish", 2, Hang(), when=carries_samples)
    publisher = Faulty(FakePublisher(), plan)
    seen: dict[str, Any] = {}

    agent = Agent(
        config, publisher=publisher, grace_s=0.2, health_interval_s=0.02, supervision=FAST
    )
    # The restart waits until the test has looked at all three endpoints: otherwise the
    # stalled state can be over (restarted, delivering) between two requests.
    looked = asyncio.Event()
    restart = agent.heartbeats._on_stall
    assert restart is not None

    def restart_after_looking(stall: Stall, probe: Probe) -> None:
        async def later() -> None:
            await looked.wait()
            restart(stall, probe)

        pending.append(asyncio.get_running_loop().create_task(later()))

    pending: list[asyncio.Task[None]] = []
    agent.heartbeats._on_stall = restart_after_looking
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.http_address is not None)
        assert agent.http_address is not None
        port = agent.http_address[1]
        with capture_logs() as logs:
            async with asyncio.timeout(20):
                while (await http_get(port, "/healthz"))[0] == 200:
                    await asyncio.sleep(0.02)
            code, body = await http_get(port, "/healthz")
            seen["healthz"] = (code, orjson.loads(body))
            code, body = await http_get(port, "/readyz")
            seen["readyz"] = (code, orjson.loads(body))
            _, metrics = await http_get(port, "/metrics")
            seen["metrics"] = metrics
            looked.set()
            sent_at_stall = agent.forwarder.stats.records_sent if agent.forwarder else 0
            await wait_for(
                lambda: (
                    agent.forwarder is not None
                    and agent.forwarder.stats.records_sent > sent_at_stall
                )
            )
            async with asyncio.timeout(20):
                while (await http_get(port, "/healthz"))[0] != 200:
                    await asyncio.sleep(0.02)
        assert await http_get(port, "/healthz") == (200, b"ok\n")
    finally:
        agent.stop()
        await task
    assert [m for m, _, _ in plan.fired] == ["publish"]
    code, health = seen["healthz"]
    assert code == 503
    assert health["healthy"] is False
    assert [s["task"] for s in health["stalled"]] == ["forwarder"]
    assert "none was delivered" in health["stalled"][0]["reason"]
    code, status = seen["readyz"]
    assert code == 503
    assert any(r.startswith("task forwarder stalled") for r in status["agent"]["not_ready"])
    forwarder = next(t for t in status["tasks"] if t["name"] == "forwarder")
    assert forwarder["state"] == "stalled"
    families = {f.name: f for f in text_string_to_metric_families(seen["metrics"].decode())}
    stalled = {s.labels["task"]: s.value for s in families["edge_agent_task_stalled"].samples}
    assert stalled["forwarder"] == 1.0
    assert families["edge_agent_healthy"].samples[0].value == 0.0
    restarts = [e for e in logs if e["event"] == "task.failed" and e["task"] == "forwarder"]
    assert restarts
    assert restarts[0]["error"].startswith("TaskStalled: stalled:")
    assert agent.supervisor.failure is None


async def test_a_forwarder_that_stays_stalled_after_its_restart_stops_the_agent(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, stall_s=0.3)
    # The broker never acknowledges data.
    plan = FaultPlan().at("publish", 1, Hang(), times=None, when=carries_samples)
    agent = Agent(
        config,
        publisher=Faulty(FakePublisher(), plan),
        grace_s=0.2,
        health_interval_s=0.02,
        supervision=FAST,
    )
    with capture_logs() as logs, pytest.raises(TaskFailed) as info:
        async with asyncio.timeout(30):
            await agent.run()
    assert info.value.task == "forwarder"
    assert "TaskStalled" in info.value.error_text
    kicks = [e for e in logs if e["event"] == "task.failed" and e["task"] == "forwarder"]
    assert len(kicks) == 1  # restarted once; still stalled a deadline later: exit
    assert [e["task"] for e in logs if e["event"] == "task.fatal"] == ["forwarder"]


def carries_samples(messages: Sequence[Message]) -> bool:
    """A forwarder's round (data topics), not a status message."""
    return any(m.topic.startswith("edge/") for m in messages)


class HangingAppend(MemoryBuffer):
    """append_many waits until `gate` is set (a disk that stopped answering)."""

    def __init__(self, config: object) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.gate = asyncio.Event()

    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]:
        await self.gate.wait()
        for device, samples in batches:
            await self.append(device, samples)
        return [None] * len(batches)


async def test_a_writer_stuck_on_the_buffer_is_reported_then_exits(tmp_path: Path) -> None:
    """Polls half-stored cannot be abandoned and retried safely: a writer stuck for its
    deadline is logged as stalled and makes the agent stop and exit 1 naming it (the
    service manager restarts it from what the buffer holds)."""
    config = make_config(tmp_path, stall_s=0.3)
    buffer = HangingAppend(config.buffer)
    agent = Agent(
        config, publisher=FakePublisher(), buffer=buffer, grace_s=0.2, health_interval_s=0.02
    )
    with capture_logs() as logs:
        task = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(20):
                while not any(e["event"] == "task.fatal" for e in logs):
                    await asyncio.sleep(0.01)
        finally:
            buffer.gate.set()  # let the stop path finish
        with pytest.raises(TaskFailed) as info:
            await task
    assert info.value.task == "buffer-writer"
    assert "TaskStalled" in info.value.error_text
    stalls = [e for e in logs if e["event"] == "task.stalled"]
    assert [(e["task"], e["action"]) for e in stalls] == [("buffer-writer", "exit")]
    assert stalls[0]["reason"] == "polls are queued for the buffer and none was stored"


async def test_a_degraded_buffer_is_shown_in_readyz_status_and_metrics(tmp_path: Path) -> None:
    config = make_config(tmp_path, http=True)
    buffer = DegradedBuffer(config.buffer)
    agent = Agent(config, publisher=FakePublisher(), buffer=buffer, grace_s=0.2)
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.http_address is not None and agent.status.ready)
        assert agent.http_address is not None
        port = agent.http_address[1]
        code, body = await http_get(port, "/readyz")
        assert code == 200  # still doing its job, in memory: ready, but shown as degraded
        status = orjson.loads(body)
        assert status["buffer"]["health"] == "degraded"
        assert status["buffer"]["degraded_reason"] == "disk I/O error; holding records in memory"
        assert status["agent"]["degraded"] == [
            "buffer degraded: disk I/O error; holding records in memory"
        ]
        code, body = await http_get(port, "/api/status")
        assert orjson.loads(body)["buffer"]["memory_records"] == 3
        _, metrics = await http_get(port, "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(metrics.decode())}
        assert families["edge_agent_buffer_degraded"].samples[0].value == 1.0
        assert families["edge_agent_buffer_memory_records"].samples[0].value == 3.0
    finally:
        agent.stop()
        await task


BAD_PLAN = """\
  - name: plc-2
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    max_registers_per_request: 2
    tags:
      - {{name: big, address: 0, type: float64}}
"""


async def test_a_device_that_cannot_be_built_fails_the_start_and_starts_nothing(
    tmp_path: Path,
) -> None:
    # The loader refuses this plan (validate = run); a config built without it still
    # meets the runtime's own guard.
    data, _, _ = load_yaml(config_text(tmp_path, extra=BAD_PLAN.format(port=free_port())))
    config = Config.model_validate(data)
    publisher = FakePublisher()
    agent = Agent(config, publisher=publisher, grace_s=0.2)
    with pytest.raises(DeviceBuildError, match="device 'plc-2': ValueError") as info:
        await agent.run()
    assert len(info.value.problems) == 1
    assert agent.devices == {}
    assert publisher.publish_calls == 0


async def test_a_reload_whose_plan_fails_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    text = config_text(tmp_path)
    path.write_text(text)
    from agent.config import load_config

    agent = Agent(load_config(path), publisher=FakePublisher(), config_path=path, grace_s=0.2)
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: "plc-1" in agent.devices)
        before = agent.devices["plc-1"]
        config = agent.config
        # plc-1 changed to a plan that cannot work, and a new device that would be fine
        broken = text.replace(
            "    tags:\n      - {name: t1, address: 0, type: uint16}",
            "    max_registers_per_request: 2\n"
            "    tags:\n      - {name: t1, address: 0, type: float64}",
        )
        assert broken != text
        path.write_text(broken + BAD_PLAN.replace("plc-2", "plc-3").format(port=free_port()))
        with capture_logs() as logs:
            result = await agent.reload()
        assert not result.ok
        # Refused by the loader, with the lines (validate = run).
        assert [p.split(" ")[1] for p in result.problems] == [
            "devices[0].tags[0].type:",
            "devices[1].tags[0].type:",
        ]
        assert agent.config is config
        assert list(agent.devices) == ["plc-1"]
        assert agent.devices["plc-1"] is before
        assert not before.task.done()
        polls = before.poller.status.polls
        await wait_for(lambda: before.poller.status.polls > polls)  # still polling
        assert agent.status.reloads_failed == 1
        event = next(e for e in logs if e["event"] == "config.reload.failed")
        assert event["problems"] == result.problems
        # The same file fixed: the reload goes through.
        path.write_text(text.replace("interval_s: 0.02", "interval_s: 0.03"))
        result = await agent.reload()
        assert result.ok
        assert result.restarted == ["plc-1"]
    finally:
        agent.stop()
        await task


async def test_the_mqtt_connection_loop_is_supervised(tmp_path: Path) -> None:
    """If the publisher's connection loop raised, nothing would reconnect and delivery
    would stop with no task stalled: it runs under the supervisor and is restarted."""
    from agent.publish.mqtt import MqttPublisher

    config = make_config(tmp_path)
    publisher = MqttPublisher(config.mqtt.model_copy(update={"port": free_port()}), "gw-sup")
    real_run = publisher._connector.run
    calls = 0

    async def flaky_run() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in the connection loop")
        await real_run()

    publisher._connector.run = flaky_run  # type: ignore[method-assign]
    agent = Agent(config, publisher=publisher, grace_s=0.2, supervision=FAST)
    with capture_logs() as logs:
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: calls >= 2)
            state = agent.supervisor.states["mqtt"]
            assert state.failures == 1
            assert state.phase == "running"
        finally:
            agent.stop()
            await task
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert [(e["task"], e["action"]) for e in failed] == [("mqtt", "restarting")]
