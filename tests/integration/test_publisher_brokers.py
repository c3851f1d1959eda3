"""The publisher's key promises against two broker implementations (`any_broker`):
mosquitto (MQTT 5) and NATS's MQTT listener (MQTT 3.1.1).

- publish + ack: every message acknowledged, delivered once, in order;
- outage + replay: the link to the broker is cut, the buffer holds what is polled
  meanwhile, and everything is delivered once it is back;
- QoS 1 redelivery: messages in flight when the broker stops answering (no PUBACK) fail
  with a timeout and are sent again from the buffer, none lost.

The outages are made with a TCP proxy between agent and broker, so the broker and the
test's subscriber stay up and the test needs nothing broker-specific."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import Config, MqttConfig, parse_config
from agent.publish import Message, PublishResult
from agent.publish.mqtt import TIMEOUT, MqttPublisher
from agent.runtime import Agent
from agent.simulate import simulators
from tests.integration.conftest import BrokerUnderTest
from tests.support.agent_proc import seqs
from tests.support.proxy import FaultProxy
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration

WAIT_S = 30.0


def _subscriber(broker: BrokerUnderTest, topic_filter: str) -> Subscriber:
    return Subscriber(broker.host, broker.port, topic_filter, protocol=broker.protocol)


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            # Polls counters of the agent and the subscriber's thread: nothing to await.
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


async def test_publish_is_acked_and_delivered_in_order(any_broker: BrokerUnderTest) -> None:
    config = MqttConfig.model_validate(
        {"host": any_broker.host, "port": any_broker.port, "protocol": any_broker.protocol}
    )
    batch = [Message("t/data", f"m-{i}".encode()) for i in range(300)]
    with _subscriber(any_broker, "t/#") as sub:
        pub = MqttPublisher(config, f"pub-{any_broker.name}")
        await pub.start()
        try:
            async with asyncio.timeout(WAIT_S):
                await pub.wait_connected()
            assert await pub.publish(batch) == [PublishResult(True)] * len(batch)
            stats = pub.stats()
            assert stats.sent == stats.acked == len(batch)
        finally:
            await pub.close()
        received = await asyncio.to_thread(sub.wait_count, len(batch), WAIT_S)
    assert [m.payload for m in received] == [m.payload for m in batch]


def _agent_config(tmp: Path, broker: BrokerUnderTest, port: int, **mqtt: object) -> Config:
    extra = "".join(f"\n  {k}: {v}" for k, v in mqtt.items())
    return parse_config(
        f"""\
agent: {{id: gw}}
mqtt:
  host: 127.0.0.1
  port: {port}
  protocol: '{broker.protocol}'
  reconnect_min_s: 0.05
  reconnect_max_s: 0.2{extra}
buffer: {{path: {tmp / "buffer.db"}}}
devices:
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: 0.05
    tags:
      - {{name: strokes, address: 0, type: uint16}}
"""
    )


async def _outage(
    tmp: Path, broker: BrokerUnderTest, fault: str, **mqtt: object
) -> tuple[Agent, list[int]]:
    """Run the agent through a proxy, break the link with `fault` until 20 more samples
    were polled with the publisher down or stuck, restore it; all seqs received."""
    with FaultProxy(broker.host, broker.port) as proxy, _subscriber(broker, "edge/#") as sub:
        config = _agent_config(tmp, broker, proxy.port, **mqtt)
        async with simulators(config) as simulated:
            agent = Agent(simulated, grace_s=10)
            task = asyncio.create_task(agent.run())
            try:
                await _until(lambda: len(sub.messages()) >= 5, "first messages")
                proxy.set_mode(fault)  # type: ignore[arg-type]
                mark = agent.status.samples_produced
                await _until(lambda: agent.status.samples_produced >= mark + 20, "polls go on")
                if fault == "blackhole":
                    forwarder = agent.forwarder
                    assert forwarder is not None
                    await _until(
                        lambda: TIMEOUT in forwarder.stats.failures_by_reason,
                        "a message in flight timed out",
                    )
                assert agent.buffer.stats().records > 0  # the buffer holds the backlog
                proxy.set_mode("pass")
                target = agent.status.samples_produced
                await _until(lambda: max(seqs(sub.messages()), default=0) >= target, "backlog")
            finally:
                agent.stop()
                await task
        produced = agent.status.samples_produced
        await asyncio.to_thread(
            sub.wait_for, lambda msgs: max(seqs(msgs), default=0) >= produced, WAIT_S
        )
        return agent, seqs(sub.messages())


async def test_outage_and_replay_lose_nothing(tmp_path: Path, any_broker: BrokerUnderTest) -> None:
    agent, received = await _outage(tmp_path, any_broker, "cut")
    assert set(received) == set(range(1, agent.status.samples_produced + 1))
    assert agent.buffer.stats().records == 0


async def test_qos1_messages_without_puback_are_sent_again(
    tmp_path: Path, any_broker: BrokerUnderTest
) -> None:
    agent, received = await _outage(tmp_path, any_broker, "blackhole", publish_timeout_s=0.5)
    assert set(received) == set(range(1, agent.status.samples_produced + 1))
    forwarder = agent.forwarder
    assert forwarder is not None
    assert forwarder.stats.failures_by_reason[TIMEOUT] >= 1
    assert forwarder.stats.dead_lettered_records == 0
