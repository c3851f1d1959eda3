"""MqttPublisher against a real mosquitto on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config import MqttConfig
from agent.publish import Message, PublishResult
from agent.publish.mqtt import DISCONNECTED, NOT_CONNECTED, TIMEOUT, MqttPublisher
from tests.integration.conftest import BrokerFactory, SubscriberFactory
from tests.support.broker import MosquittoBroker, free_port

pytestmark = pytest.mark.integration

WAIT_S = 15.0  # upper bound for things that happen "soon"; never a performance threshold


def _config(broker: MosquittoBroker, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    values.update(overrides)
    return MqttConfig.model_validate(values)


def _batch(n: int, prefix: str, topic: str = "t/data") -> list[Message]:
    return [Message(topic, f"{prefix}-{i}".encode()) for i in range(n)]


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        # Polls state owned by other processes and counters; there is no event to await.
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


@asynccontextmanager
async def _publisher(
    config: MqttConfig, client_id: str = "test-pub", *, connect: bool = True, **kwargs: Any
) -> AsyncIterator[MqttPublisher]:
    pub = MqttPublisher(config, client_id, **kwargs)
    await pub.start()
    try:
        if connect:
            async with asyncio.timeout(WAIT_S):
                await pub.wait_connected()
        yield pub
    finally:
        await pub.close()


def _publishes_logged(broker: MosquittoBroker, client_id: str, since: int = 0) -> list[str]:
    """Topics and flags of every PUBLISH the broker received from client_id (from its log)."""
    text = broker.log_text()[since:]
    return re.findall(rf"Received PUBLISH from {re.escape(client_id)} \((.*?)\)", text)


async def test_batch_is_acked_and_delivered_in_order(
    broker: MosquittoBroker, subscriber_factory: SubscriberFactory
) -> None:
    sub = subscriber_factory(broker, "t/#")
    batch = _batch(300, "a")
    async with _publisher(_config(broker)) as pub:
        results = await pub.publish(batch)
        assert results == [PublishResult(True)] * len(batch)
        received = await asyncio.to_thread(sub.wait_count, len(batch))
        assert [m.payload for m in received] == [m.payload for m in batch]
        stats = pub.stats()
        assert stats.connected
        assert stats.sent == stats.acked == len(batch)
        assert stats.failed == {}
        # mosquitto announces Receive Maximum 20 (its max_inflight_messages) and we obey it.
        assert stats.window == 20


async def test_window_follows_config_when_broker_allows_more(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory(extra_config=["max_inflight_messages 1000"])
    async with _publisher(_config(broker, max_inflight=50)) as pub:
        assert pub.stats().window == 50
        assert all(r.ok for r in await pub.publish(_batch(200, "w")))


async def test_message_over_broker_maximum_packet_size_fails_alone(
    broker_factory: BrokerFactory, subscriber_factory: SubscriberFactory
) -> None:
    broker = broker_factory(extra_config=["max_packet_size 2000"])
    sub = subscriber_factory(broker, "t/#")
    async with _publisher(_config(broker)) as pub:
        results = await pub.publish(
            [
                Message("t/a", b"small"),
                Message("t/big", b"x" * 3000),
                Message("t/b", b"small too", qos=0),
            ]
        )
        assert results == [
            PublishResult(True),
            PublishResult(False, "Packet too large", 0x95),
            PublishResult(True),
        ]
        received = await asyncio.to_thread(sub.wait_count, 2)
        assert [m.topic for m in received] == ["t/a", "t/b"]
        assert pub.stats().disconnects == 0
        assert pub.max_packet_size == 2000  # from the CONNACK, for the forwarder to split
        assert pub.stats().max_packet_size == 2000


async def test_broker_down_fails_fast_then_reconnects_without_resending(
    broker: MosquittoBroker, subscriber_factory: SubscriberFactory
) -> None:
    async with _publisher(_config(broker), "pub-restart") as pub:
        first = _batch(20, "before")
        assert all(r.ok for r in await pub.publish(first))

        broker.stop()
        await _until(lambda: not pub.connected, "publisher notices the broker is gone")
        down = await pub.publish(_batch(5, "down"))
        assert down == [PublishResult(False, NOT_CONNECTED)] * 5

        log_mark = len(broker.log_text())
        broker.restart()
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        sub = subscriber_factory(broker, "t/#")
        after = _batch(20, "after")
        assert all(r.ok for r in await pub.publish(after))
        received = await asyncio.to_thread(sub.wait_count, len(after))
        assert [m.payload for m in received] == [m.payload for m in after]
        # The broker saw exactly the new messages from us after the restart: nothing was
        # re-sent by paho (neither the acked nor the refused ones).
        logged = await asyncio.to_thread(lambda: _publishes_logged(broker, "pub-restart", log_mark))
        assert len(logged) == len(after)
        assert all(flags.startswith("d0") for flags in logged)
        stats = pub.stats()
        assert stats.connects == 2
        assert stats.disconnects == 1
        assert stats.failed == {NOT_CONNECTED: 5}


async def test_in_flight_messages_fail_when_broker_dies_and_are_not_resent(
    broker: MosquittoBroker, subscriber_factory: SubscriberFactory
) -> None:
    async with _publisher(_config(broker, publish_timeout_s=60), "pub-kill") as pub:
        broker.pause()  # the broker takes our bytes but answers nothing: no PUBACK
        doomed = _batch(10, "doomed")
        task = asyncio.create_task(pub.publish(doomed))
        await _until(lambda: pub.stats().inflight == len(doomed), "all 10 handed to paho")
        log_mark = len(broker.log_text())
        broker.kill()
        results = await asyncio.wait_for(task, WAIT_S)
        assert results == [PublishResult(False, DISCONNECTED)] * len(doomed)

        broker.restart()
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        sub = subscriber_factory(broker, "t/#")
        marker = Message("t/marker", b"marker")
        assert await pub.publish([marker]) == [PublishResult(True)]
        received = await asyncio.to_thread(sub.wait_count, 1)
        assert [m.payload for m in received] == [b"marker"]
        logged = _publishes_logged(broker, "pub-kill", log_mark)
        assert len(logged) == 1
        assert "'t/marker'" in logged[0]
        assert pub.stats().failed == {DISCONNECTED: len(doomed)}


async def test_unacknowledged_message_times_out_and_publisher_recovers(
    broker: MosquittoBroker,
) -> None:
    async with _publisher(_config(broker, publish_timeout_s=0.2), "pub-timeout") as pub:
        broker.pause()
        try:
            results = await asyncio.wait_for(pub.publish(_batch(5, "slow")), WAIT_S)
        finally:
            broker.resume()
        assert results[0] == PublishResult(False, TIMEOUT)
        assert {r.reason for r in results} <= {TIMEOUT, DISCONNECTED}
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        assert await pub.publish(_batch(1, "ok")) == [PublishResult(True)]


async def test_cancelled_publish_leaves_publisher_usable(broker: MosquittoBroker) -> None:
    async with _publisher(_config(broker), "pub-cancel") as pub:
        broker.pause()
        task = asyncio.create_task(pub.publish(_batch(5, "cancelled")))
        try:
            await _until(lambda: pub.stats().inflight == 5, "5 handed to paho")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            broker.resume()
        # The cancelled messages are still acknowledged on the same connection.
        await _until(lambda: pub.stats().acked == 5, "late PUBACKs processed")
        assert await pub.publish(_batch(3, "next")) == [PublishResult(True)] * 3
        assert pub.stats().disconnects == 0


async def test_acl_denied_topic_fails_with_mqtt5_reason_code(
    broker_factory: BrokerFactory, subscriber_factory: SubscriberFactory
) -> None:
    broker = broker_factory(acl="topic write allowed/#\ntopic read #\n")
    sub = subscriber_factory(broker, "#")
    async with _publisher(_config(broker)) as pub:
        results = await pub.publish(
            [Message("denied/x", b"no"), Message("allowed/x", b"yes"), Message("denied/y", b"no")]
        )
        assert results == [
            PublishResult(False, "Not authorized", 0x87),
            PublishResult(True),
            PublishResult(False, "Not authorized", 0x87),
        ]
        received = await asyncio.to_thread(sub.wait_count, 1)
        assert [m.topic for m in received] == ["allowed/x"]
        assert pub.stats().failed == {"Not authorized": 2}
        # A refusal concerns the message only: the connection stays up.
        assert pub.connected
        assert pub.stats().disconnects == 0
        assert pub.stats().connects == 1


async def test_topic_paho_rejects_fails_permanently_and_alone(
    broker: MosquittoBroker, subscriber_factory: SubscriberFactory
) -> None:
    sub = subscriber_factory(broker, "t/#")
    async with _publisher(_config(broker)) as pub:
        results = await pub.publish([Message("t/a+b", b"no"), Message("t/ok", b"yes")])
        assert not results[0].ok
        assert results[0].permanent
        assert (results[0].reason or "").startswith("invalid message: ")
        assert results[1] == PublishResult(True)
        received = await asyncio.to_thread(sub.wait_count, 1)
        assert [m.topic for m in received] == ["t/ok"]
        assert pub.connected
        assert pub.stats().disconnects == 0


async def test_mqtt311_publishes_and_cannot_see_acl_denials(
    broker_factory: BrokerFactory, subscriber_factory: SubscriberFactory
) -> None:
    broker = broker_factory(acl="topic write allowed/#\ntopic read #\n")
    sub = subscriber_factory(broker, "#", protocol="3.1.1")
    async with _publisher(_config(broker, protocol="3.1.1")) as pub:
        batch = _batch(50, "v311", topic="allowed/data")
        assert all(r.ok for r in await pub.publish(batch))
        received = await asyncio.to_thread(sub.wait_count, len(batch))
        assert [m.payload for m in received] == [m.payload for m in batch]
        # With 3.1.1 mosquitto acks a denied publish as a success (docs/mqtt.md).
        assert await pub.publish([Message("denied/x", b"lost")]) == [PublishResult(True)]
        assert await pub.publish([Message("allowed/end", b"end")]) == [PublishResult(True)]
        received = await asyncio.to_thread(sub.wait_count, len(batch) + 1)
        assert "denied/x" not in [m.topic for m in received]


async def test_username_password_from_file(
    broker_factory: BrokerFactory, subscriber_factory: SubscriberFactory, tmp_path: Path
) -> None:
    broker = broker_factory(users={"agent": "s3cret-Pw", "reader": "r"})
    sub = subscriber_factory(broker, "t/#", username="reader", password="r")
    pw_file = tmp_path / "pw"
    pw_file.write_text("s3cret-Pw\n", encoding="utf-8")
    config = _config(broker, username="agent", password_file=str(pw_file))
    async with _publisher(config) as pub:
        assert await pub.publish(_batch(1, "auth")) == [PublishResult(True)]
        assert [m.payload for m in await asyncio.to_thread(sub.wait_count, 1)] == [b"auth-0"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_wrong_password_is_not_connected_and_logged_once(
    broker_factory: BrokerFactory, protocol: str
) -> None:
    broker = broker_factory(users={"agent": "right"})
    config = _config(broker, username="agent", password="wrong-Pw-123", protocol=protocol)
    with capture_logs() as logs:
        async with _publisher(config, connect=False) as pub:
            await _until(lambda: pub.stats().connect_failures >= 3, "three refused attempts")
            assert not pub.connected
            assert await pub.publish(_batch(2, "x")) == [PublishResult(False, NOT_CONNECTED)] * 2
    failed = [e for e in logs if e["event"] == "mqtt.connect.failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "warning"
    assert "broker refused" in failed[0]["reason"]
    assert not [e for e in logs if e["event"] == "mqtt.connected"]
    assert "wrong-Pw-123" not in repr(logs)


async def test_unreachable_broker_logged_once(broker: MosquittoBroker) -> None:
    broker.stop()
    with capture_logs() as logs:
        async with _publisher(_config(broker), connect=False) as pub:
            await _until(lambda: pub.stats().connect_failures >= 3, "three refused attempts")
    failed = [e for e in logs if e["event"] == "mqtt.connect.failed"]
    assert [e["reason"] for e in failed] == ["connection refused"]


async def test_connect_and_disconnect_transitions_are_logged(broker: MosquittoBroker) -> None:
    with capture_logs() as logs:
        async with _publisher(_config(broker)) as pub:
            broker.stop()
            await _until(lambda: pub.stats().connect_failures >= 2, "two refused attempts")
            broker.restart()
            async with asyncio.timeout(WAIT_S):
                await pub.wait_connected()
    events = [
        (e["event"], e["log_level"])
        for e in logs
        if e["event"].startswith("mqtt.") and e["log_level"] != "debug"
    ]
    assert events == [
        ("mqtt.connected", "info"),
        ("mqtt.disconnected", "warning"),
        ("mqtt.connect.failed", "warning"),
        ("mqtt.connected", "info"),
    ]


async def test_birth_on_every_connect_and_will_on_abrupt_loss(
    broker: MosquittoBroker, subscriber_factory: SubscriberFactory
) -> None:
    sub = subscriber_factory(broker, "status/#")
    will = Message("status/agent", b"offline", retain=True)

    def birth() -> Sequence[Message]:
        return [Message("status/agent", b"online", retain=True)]

    async with _publisher(_config(broker), will=will, on_connect_messages=birth) as pub:
        await asyncio.to_thread(sub.wait_for, lambda ms: [m.payload for m in ms] == [b"online"])
        # Cut the TCP connection under the publisher: no DISCONNECT, so the broker
        # publishes the will; the publisher reconnects and announces itself again.
        link = pub._link
        assert link is not None
        link.session.sock.shutdown(socket.SHUT_RDWR)
        await asyncio.to_thread(
            sub.wait_for,
            lambda ms: [m.payload for m in ms] == [b"online", b"offline", b"online"],
        )
    # A clean close sends DISCONNECT: the broker discards the will.
    late = subscriber_factory(broker, "status/#")
    retained = await asyncio.to_thread(late.wait_count, 1)
    assert [(m.payload, m.retain) for m in retained] == [(b"online", True)]


async def test_close_is_idempotent_and_publish_after_close_fails(broker: MosquittoBroker) -> None:
    pub = MqttPublisher(_config(broker), "pub-close")
    await pub.start()
    async with asyncio.timeout(WAIT_S):
        await pub.wait_connected()
    await pub.close()
    await pub.close()
    assert not pub.connected
    assert await pub.publish(_batch(1, "late")) == [PublishResult(False, NOT_CONNECTED)]


async def test_close_while_reconnecting() -> None:
    config = MqttConfig(host="127.0.0.1", port=free_port(), reconnect_min_s=0.05)
    pub = MqttPublisher(config, "pub-nobroker")
    await pub.start()
    await _until(lambda: pub.stats().connect_failures >= 1, "a refused attempt")
    async with asyncio.timeout(WAIT_S):
        await pub.close()
    assert not pub.connected
    assert pub.stats().connects == 0


async def test_the_session_socket_does_not_wait_for_nagle(broker: MosquittoBroker) -> None:
    """TCP_NODELAY on the agent's connection: without it a small packet (a command result,
    the last PUBLISH of a round) waits for the ACK of the one before it."""
    import socket

    from agent.publish.session import connect

    session = await connect(_config(broker), "pub-nodelay")
    try:
        assert session.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        session.disconnect()
        session.end("test over")
