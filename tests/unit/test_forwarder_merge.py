"""merge_records: under a publish-rate limit a device's records of one round go out as
one message (within the packet limit), committed together; nothing is dropped."""

from __future__ import annotations

import orjson

from agent.buffer import Record
from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.payload import PayloadEncoder
from agent.publish import packet_size
from agent.publish.fake import FakePublisher
from tests.support.payloads import decoded
from tests.support.samples import make_samples, wire_sample


async def _setup(**kwargs: object) -> tuple[MemoryBuffer, FakePublisher, Forwarder]:
    buf = MemoryBuffer(BufferConfig(kind="memory"))
    await buf.open()
    pub = FakePublisher()
    await pub.start()
    encoder = PayloadEncoder(AgentSection(id="gw"), MqttConfig())
    return buf, pub, Forwarder(buf, pub, encoder, **kwargs)  # type: ignore[arg-type]


def _seqs(pub: FakePublisher, device: str) -> list[int]:
    out: list[int] = []
    for d in decoded(pub.published):
        if d.device == device:
            out += [int(s["seq"]) for s in d.samples]
    return out


async def test_records_of_a_device_become_one_message_per_round() -> None:
    buf, pub, fwd = await _setup(merge_records=True)
    seq = 0
    for _ in range(10):
        for device in ("a", "b"):
            seq += 1
            await buf.append(device, [wire_sample(device, seq)])
    assert await fwd.forward_once()
    assert len(pub.published) == 2  # one per device instead of 20
    assert _seqs(pub, "a") == list(range(1, 21, 2))
    assert _seqs(pub, "b") == list(range(2, 21, 2))
    assert buf.stats().records == 0  # every merged record committed
    assert fwd.stats.records_sent == 20
    assert fwd.stats.merged_records == 20
    assert fwd.stats.samples_delivered == 20


async def test_without_merge_each_record_is_its_own_message() -> None:
    buf, pub, fwd = await _setup()
    for seq in range(1, 6):
        await buf.append("a", [wire_sample("a", seq)])
    assert await fwd.forward_once()
    assert len(pub.published) == 5
    assert fwd.stats.merged_records == 0


async def test_merged_messages_stay_within_the_packet_limit() -> None:
    buf, pub, fwd = await _setup(merge_records=True, max_message_bytes=12_000)
    seq = 1
    for _ in range(12):
        await buf.append("a", make_samples(seq, 5, device="a", pad=200))
        seq += 5
    assert await fwd.forward_once()
    assert len(pub.published) > 1
    assert all(len(m.payload) <= 12_000 for m in pub.published)
    assert _seqs(pub, "a") == list(range(1, seq))
    assert buf.stats().records == 0


async def test_a_failed_merged_message_keeps_every_record_for_the_next_round() -> None:
    buf, pub, fwd = await _setup(merge_records=True)
    for seq in range(1, 6):
        await buf.append("a", [wire_sample("a", seq)])
    pub.fail_next(1, "disconnected before ack")
    assert await fwd.forward_once()
    assert buf.stats().records == 5  # nothing committed
    assert await fwd.forward_once()
    assert buf.stats().records == 0
    assert _seqs(pub, "a") == [1, 2, 3, 4, 5]
    body = orjson.loads(pub.published[-1].payload)
    assert body.get("historical") is True  # sent again: marked as backlog


async def test_merged_records_respect_the_brokers_packet_size() -> None:
    buf, pub, fwd = await _setup(merge_records=True)
    pub.max_packet_size = 3_000  # the broker's, learnt only from the refusal
    seq = 1
    for _ in range(10):
        await buf.append("a", make_samples(seq, 2, device="a", pad=100))
        seq += 2
    for _ in range(10):
        await fwd.forward_once()
        if buf.stats().records == 0:
            break
    assert buf.stats().records == 0
    assert sorted(set(_seqs(pub, "a"))) == list(range(1, seq))
    assert all(packet_size(m) <= 3_000 for m in pub.published)
    assert fwd.stats.dead_lettered_records == 0


async def test_a_record_that_does_not_decode_is_not_merged() -> None:
    _, _, fwd = await _setup(merge_records=True)
    good = [Record(i, "a", i, i, 1, 0.0, orjson.dumps([dict(wire_sample("a", i))])) for i in (1, 2)]
    bad = Record(3, "a", 3, 3, 1, 0.0, b"not json")
    merged = fwd._merge([good[0], bad, good[1]], None)
    # The damaged one joined the group first, so the group is left as it was: each
    # record goes its own way (the damaged one to the poison handling).
    assert [r.id for r in merged] == [1, 3, 2]
