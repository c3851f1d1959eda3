"""FakePublisher follows the Publisher contract and does what a test scripts."""

from __future__ import annotations

import asyncio

import pytest

from agent.publish import Message, Publisher, PublishResult
from agent.publish.fake import FakePublisher


def _msgs(n: int, prefix: str = "m") -> list[Message]:
    return [Message(f"t/{prefix}{i}", f"{prefix}{i}".encode()) for i in range(n)]


async def test_satisfies_publisher_protocol() -> None:
    pub: Publisher = FakePublisher()
    await pub.start()
    assert pub.connected
    await pub.close()
    assert not pub.connected


async def test_publishes_and_records_in_order() -> None:
    pub = FakePublisher()
    await pub.start()
    msgs = _msgs(5)
    results = await pub.publish(msgs)
    assert results == [PublishResult(True)] * 5
    assert pub.published == msgs
    assert [a.message for a in pub.attempts] == msgs


async def test_not_connected_fails_everything_at_once() -> None:
    pub = FakePublisher(connect_on_start=False)
    await pub.start()
    assert not pub.connected
    results = await pub.publish(_msgs(3))
    assert results == [PublishResult(False, "not connected")] * 3
    assert pub.published == []
    pub.set_connected(True)
    assert await pub.publish(_msgs(1)) == [PublishResult(True)]


async def test_fail_next_then_recover() -> None:
    pub = FakePublisher()
    await pub.start()
    pub.fail_next(2, "Not authorized", code=0x87)
    results = await pub.publish(_msgs(3))
    assert results == [
        PublishResult(False, "Not authorized", 0x87),
        PublishResult(False, "Not authorized", 0x87),
        PublishResult(True),
    ]
    assert pub.published == _msgs(3)[2:]


async def test_fail_next_is_not_consumed_while_disconnected() -> None:
    pub = FakePublisher()
    await pub.start()
    pub.fail_next(1, "timeout")
    pub.set_connected(False)
    assert (await pub.publish(_msgs(1)))[0].reason == "not connected"
    pub.set_connected(True)
    assert (await pub.publish(_msgs(1)))[0].reason == "timeout"


async def test_ack_delay_holds_results_until_acked() -> None:
    pub = FakePublisher()
    await pub.start()
    pub.set_ack_delay(0.05)
    task = asyncio.create_task(pub.publish(_msgs(2)))
    await asyncio.sleep(0)
    assert not task.done()
    assert pub.published == []
    assert await task == [PublishResult(True)] * 2


async def test_disconnect_during_ack_delay_fails_before_ack() -> None:
    pub = FakePublisher(ack_delay_s=0.05)
    await pub.start()
    task = asyncio.create_task(pub.publish(_msgs(2)))
    await asyncio.sleep(0)
    pub.set_connected(False)
    assert await task == [PublishResult(False, "disconnected before ack")] * 2
    assert pub.published == []


async def test_windows_respect_max_inflight() -> None:
    pub = FakePublisher(max_inflight=3, ack_delay_s=0.001)
    await pub.start()
    results = await pub.publish(_msgs(10))
    assert all(r.ok for r in results)
    assert pub.max_seen_inflight == 3


async def test_wait_connected() -> None:
    pub = FakePublisher(connect_on_start=False)
    await pub.start()
    waiter = asyncio.create_task(pub.wait_connected())
    await asyncio.sleep(0)
    assert not waiter.done()
    pub.set_connected(True)
    await asyncio.wait_for(waiter, 1)


async def test_closed_stays_disconnected() -> None:
    pub = FakePublisher()
    await pub.start()
    await pub.close()
    pub.set_connected(True)
    assert not pub.connected


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        FakePublisher(max_inflight=0)
    pub = FakePublisher()
    with pytest.raises(ValueError, match="count"):
        pub.fail_next(-1, "x")
    with pytest.raises(ValueError, match="delay"):
        pub.set_ack_delay(-1)
