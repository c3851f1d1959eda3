"""The runtime hands the forwarder and the dead-letter store their config."""

from __future__ import annotations

import asyncio

from agent.buffer.memory import MemoryBuffer
from agent.config import BufferConfig, parse_config
from agent.publish.fake import FakePublisher
from agent.runtime import Agent


async def test_mqtt_limits_reach_the_forwarder_and_the_store() -> None:
    config = parse_config(
        """\
agent: {id: gw}
mqtt: {max_message_bytes: 4096, dead_letter_max_bytes: 100000}
buffer: {kind: memory}
devices:
  - name: plc
    protocol: modbus
    host: 127.0.0.1
    port: 9
    interval_s: 60
    tags:
      - {name: t, address: 0, type: int16}
"""
    )
    buffer = MemoryBuffer(BufferConfig.model_validate({"kind": "memory"}))
    agent = Agent(config, publisher=FakePublisher(), buffer=buffer, grace_s=0.5)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(10):
            while agent.forwarder is None:
                await asyncio.sleep(0.01)
        assert agent.forwarder.max_message_bytes == 4096
        assert agent.forwarder.dead_letters.max_bytes == 100000
    finally:
        agent.stop()
        await task
