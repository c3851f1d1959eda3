"""Forwarder + payload: historical marking, gap notices, dead letters, retained last values."""

from __future__ import annotations

from typing import Any

import orjson

from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.payload import PayloadEncoder
from agent.publish.fake import FakePublisher
from agent.schema import SamplePayload
from tests.support.payloads import batches
from tests.support.samples import wire_sample


async def _setup(
    *, mqtt: dict[str, Any] | None = None, buffer: dict[str, Any] | None = None, **kw: Any
) -> tuple[MemoryBuffer, FakePublisher, Forwarder]:
    # model_copy skips validation: the tests want buffers far below the 1 MiB minimum.
    config = BufferConfig.model_validate({"kind": "memory"}).model_copy(update=buffer or {})
    buf = MemoryBuffer(config)
    await buf.open()
    pub = FakePublisher(connect_on_start=False)
    await pub.start()
    cfg = MqttConfig.model_validate(mqtt or {})
    kw.setdefault("device_backoff_min_s", 0.0)
    kw.setdefault("device_backoff_max_s", 0.0)
    fwd = Forwarder(buf, pub, PayloadEncoder(AgentSection(id="gw"), cfg), **kw)
    fwd._backoff.min_s = fwd._backoff.max_s = 0.001
    return buf, pub, fwd


async def test_backlog_is_historical_and_live_is_not() -> None:
    buf, pub, fwd = await _setup()
    await buf.append("d", [wire_sample("d", 1)])  # appended while disconnected: backlog
    pub.set_connected(True)
    await fwd.forward_once()
    await buf.append("d", [wire_sample("d", 2)])  # appended while connected: live
    await fwd.forward_once()
    bodies = batches(pub.published)
    assert [(b.samples[0].seq, b.historical) for b in bodies] == [(1, True), (2, False)]
    assert b'"historical"' not in pub.published[1].payload  # absent when live


async def test_retry_after_failed_attempt_is_historical() -> None:
    buf, pub, fwd = await _setup()
    pub.set_connected(True)
    await buf.append("d", [wire_sample("d", 1)])
    pub.fail_next(1, "disconnected before ack")
    await fwd.forward_once()
    await fwd.forward_once()
    [body] = batches(pub.published)
    assert body.historical
    assert fwd.stats.refusals == 0  # a lost ack is not a refusal


async def test_gap_notice_rides_on_next_message_until_acked() -> None:
    # A buffer that holds one record: the second append evicts the first.
    buf, pub, fwd = await _setup(buffer={"max_bytes": 400, "when_full": "drop_oldest"})
    await buf.append("d", [wire_sample("d", 1)])
    await buf.append("d", [wire_sample("d", 2)])
    assert buf.stats().dropped_samples == 1
    pub.set_connected(True)
    pub.fail_next(1, "Quota exceeded", code=0x97)
    await fwd.forward_once()  # refused: the notice stays
    assert await buf.take_gaps()
    await fwd.forward_once()
    body = batches(pub.published[:1])[0]
    assert body.gaps is not None
    assert [(g.first_seq, g.last_seq, g.count, g.reason) for g in body.gaps] == [
        (1, 1, 1, "drop_oldest")
    ]
    assert await buf.take_gaps() == []
    await buf.append("d", [wire_sample("d", 3)])
    await fwd.forward_once()
    assert batches(pub.published[1:2])[0].gaps is None


async def test_transiently_refused_record_is_dead_lettered_after_max_refusals() -> None:
    buf, pub, fwd = await _setup(max_refusals=3)
    pub.set_connected(True)
    await buf.append("a", [wire_sample("a", 1)])
    await buf.append("b", [wire_sample("b", 2)])
    pub.fail_next(1, "Quota exceeded", code=0x97)
    await fwd.forward_once()  # a refused (1), b delivered
    pub.fail_next(2, "Quota exceeded", code=0x97)
    await fwd.forward_once()  # a refused (2)
    await fwd.forward_once()  # a refused (3) → dead letter
    assert buf.stats().records == 0
    letters = await fwd.dead_letters.all()
    assert [(d.device, d.tries, d.code) for d in letters] == [("a", 3, 0x97)]
    assert fwd.stats.refusals == 3
    assert fwd.stats.dead_lettered_samples == 1
    assert [orjson.loads(m.payload)["device"] for m in pub.published] == ["b"]


async def test_permanently_refused_record_is_dead_lettered_at_once() -> None:
    buf, pub, fwd = await _setup(max_refusals=3)
    pub.set_connected(True)
    await buf.append("a", [wire_sample("a", 1)])
    await buf.append("b", [wire_sample("b", 2)])
    pub.fail_next(1, "Not authorized", code=0x87)
    await fwd.forward_once()
    assert buf.stats().records == 0
    letters = await fwd.dead_letters.all()
    assert [(d.device, d.tries, d.code) for d in letters] == [("a", 1, 0x87)]
    assert fwd.stats.dead_lettered_by_reason == {"Not authorized": 1}
    assert [orjson.loads(m.payload)["device"] for m in pub.published] == ["b"]


async def test_tag_layout_retains_live_values_only() -> None:
    buf, pub, fwd = await _setup(
        mqtt={"layout": "tag", "retain_last": True, "topic_tag": "{agent}/{device}/{tag}"}
    )
    await buf.append("d", [wire_sample("d", 1)])
    pub.set_connected(True)
    await fwd.forward_once()
    await buf.append("d", [wire_sample("d", 2)])
    await fwd.forward_once()
    assert [(m.topic, m.retain) for m in pub.published] == [("gw/d/t", False), ("gw/d/t", True)]
    first = SamplePayload.model_validate_json(pub.published[0].payload)
    assert first.historical
    assert first.seq == 1
