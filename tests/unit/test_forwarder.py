"""Forwarder lifecycle with the fake publisher: a stop lets the round in flight finish."""

from __future__ import annotations

import asyncio

from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.payload import PayloadEncoder
from agent.publish.fake import FakePublisher
from tests.support.samples import wire_sample


async def _forwarder() -> tuple[MemoryBuffer, FakePublisher, Forwarder]:
    buf = MemoryBuffer(BufferConfig(kind="memory"))
    await buf.open()
    pub = FakePublisher()
    await pub.start()
    fwd = Forwarder(buf, pub, PayloadEncoder(AgentSection(id="gw"), MqttConfig()))
    return buf, pub, fwd


async def test_stop_during_a_round_commits_what_was_acked() -> None:
    buf, pub, fwd = await _forwarder()
    pub.set_ack_delay(0.2)
    for seq in range(1, 6):
        await buf.append("d", [wire_sample("d", seq)])
    task = asyncio.create_task(fwd.run())
    while pub.publish_calls == 0:
        await asyncio.sleep(0.01)
    fwd.request_stop()  # while the round waits for its acks
    await asyncio.wait_for(task, 5)
    assert buf.stats().records == 0
    assert len(pub.published) == 5  # each sent once: nothing left to send again


async def test_stop_while_idle_returns_at_once() -> None:
    _, _, fwd = await _forwarder()
    task = asyncio.create_task(fwd.run())
    await asyncio.sleep(0.05)
    fwd.request_stop()
    await asyncio.wait_for(task, 5)
    assert task.done()
