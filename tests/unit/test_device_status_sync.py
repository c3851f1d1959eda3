"""DeviceStatusSync with the fake publisher: every retained status arrives, failed ones are
sent again until acknowledged, a newer status supersedes an older one, all are re-sent
after a reconnect, and a removed device's status is cleared (empty retained message)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from agent.config import AgentSection, MqttConfig
from agent.publish import Message
from agent.publish.fake import FakePublisher
from agent.publish.status import DeviceStatusSync, StatusMessages


def messages() -> StatusMessages:
    return StatusMessages(
        AgentSection(id="gw"), MqttConfig(), version="t", config_hash="h", started=time.time()
    )


def retained(pub: FakePublisher) -> dict[str, bytes]:
    """What a late subscriber would get: the last acknowledged retained payload per topic,
    with empty payloads clearing it."""
    out: dict[str, bytes] = {}
    for m in pub.published:
        if m.retain:
            if m.payload:
                out[m.topic] = m.payload
            else:
                out.pop(m.topic, None)
    return out


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


@pytest.fixture
async def sync() -> AsyncIterator[tuple[DeviceStatusSync, StatusMessages, FakePublisher]]:
    msgs = messages()
    pub = FakePublisher(max_inflight=20)  # mosquitto's Receive Maximum
    await pub.start()
    s = DeviceStatusSync(msgs, pub, retry_min_s=0.01, retry_max_s=0.02, session_check_s=0.01)
    task = asyncio.create_task(s.run())
    yield s, msgs, pub
    task.cancel()
    await asyncio.wait({task})


async def test_every_status_arrives_with_more_devices_than_the_window(
    sync: tuple[DeviceStatusSync, StatusMessages, FakePublisher],
) -> None:
    s, msgs, pub = sync
    for i in range(30):
        s.send(msgs.device(f"d{i}", "down", "connection refused", time.time()))
    await wait_for(lambda: s.pending == 0)
    assert len(retained(pub)) == 30
    assert pub.max_seen_inflight <= 20


async def test_failed_statuses_are_sent_again_until_acknowledged(
    sync: tuple[DeviceStatusSync, StatusMessages, FakePublisher],
) -> None:
    s, msgs, pub = sync
    pub.fail_next(25, "timeout")  # more failures than one round's messages
    for i in range(10):
        s.send(msgs.device(f"d{i}", "up", None, time.time()))
    await wait_for(lambda: s.pending == 0)
    assert sorted(retained(pub)) == sorted(f"edge-status/gw/d{i}" for i in range(10))
    assert s.failed == 25


async def test_a_newer_status_supersedes_one_not_yet_acknowledged(
    sync: tuple[DeviceStatusSync, StatusMessages, FakePublisher],
) -> None:
    s, msgs, pub = sync
    pub.set_connected(False)
    await asyncio.sleep(0.02)
    s.send(msgs.device("d0", "down", "timeout", time.time()))
    s.send(msgs.device("d0", "up", None, time.time()))
    pub.set_connected(True)
    await wait_for(lambda: s.pending == 0)
    assert b'"state":"up"' in retained(pub)["edge-status/gw/d0"]
    assert all(b'"down"' not in m.payload for m in pub.published)


async def test_all_statuses_are_sent_again_after_a_reconnect(
    sync: tuple[DeviceStatusSync, StatusMessages, FakePublisher],
) -> None:
    s, msgs, pub = sync
    for i in range(3):
        s.send(msgs.device(f"d{i}", "up", None, time.time()))
    await wait_for(lambda: s.pending == 0)
    pub.clear()
    pub.set_connected(False)
    await asyncio.sleep(0.02)
    pub.set_connected(True)
    await wait_for(lambda: len(retained(pub)) == 3)


async def test_a_removed_device_is_cleared_and_not_sent_again(
    sync: tuple[DeviceStatusSync, StatusMessages, FakePublisher],
) -> None:
    s, msgs, pub = sync
    s.send(msgs.device("keep", "up", None, time.time()))
    s.send(msgs.device("gone", "up", None, time.time()))
    await wait_for(lambda: len(retained(pub)) == 2)
    s.send(msgs.removed("gone"))
    await wait_for(lambda: s.pending == 0)
    assert list(retained(pub)) == ["edge-status/gw/keep"]
    cleared = [m for m in pub.published if m.topic == "edge-status/gw/gone" and not m.payload]
    assert cleared == [Message("edge-status/gw/gone", b"", qos=1, retain=True)]
    assert [m.topic for m in msgs.devices()] == ["edge-status/gw/keep"]


def test_the_birth_is_only_the_agent_status() -> None:
    msgs = messages()
    msgs.device("d0", "up", None, time.time())
    (birth,) = msgs.birth()
    assert birth.topic == "edge-status/gw"
    assert b'"online"' in birth.payload
