"""Poison records: what the forwarder does with records that cannot be published as they
are (split, dead-letter, per-device backoff), the dead-letter gap notice, replay and the
dead-letter store's byte bound."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from agent.buffer import Record
from agent.buffer.common import record_samples
from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder, _pieces
from agent.payload import PayloadEncoder
from agent.publish import Message, packet_size
from agent.publish.deadletter import DeadLetters
from agent.publish.fake import FakePublisher
from agent.schema import BatchPayload
from tests.support.payloads import batches
from tests.support.samples import pad_text, wire_sample


class _Encoder(PayloadEncoder):
    """Raises for the devices in `poisoned`, as an encoder bug or an unencodable value would."""

    poisoned: set[str]

    def encode(self, record: Record, *, historical: bool = False, gaps: Any = ()) -> list[Message]:
        if record.device in self.poisoned:
            raise OverflowError("timestamp out of range")
        return super().encode(record, historical=historical, gaps=gaps)


async def _setup(
    *, dead_letters: DeadLetters | None = None, topic: str = "edge/gw/{device}", **kw: Any
) -> tuple[MemoryBuffer, FakePublisher, Forwarder]:
    buf = MemoryBuffer(BufferConfig.model_validate({"kind": "memory"}))
    await buf.open()
    pub = FakePublisher()
    await pub.start()
    encoder = _Encoder(AgentSection(id="gw"), MqttConfig.model_validate({"topic": topic}))
    encoder.poisoned = set()
    kw.setdefault("device_backoff_min_s", 0.0)
    kw.setdefault("device_backoff_max_s", 0.0)
    fwd = Forwarder(buf, pub, encoder, dead_letters=dead_letters, **kw)
    return buf, pub, fwd


def _bodies(pub: FakePublisher) -> list[BatchPayload]:
    return batches(pub.published)


async def _append(buf: MemoryBuffer, device: str, first_seq: int, n: int = 1) -> None:
    await buf.append(
        device, [wire_sample(device, s, tag=f"t{s}") for s in range(first_seq, first_seq + n)]
    )


async def test_denied_device_is_dead_lettered_once_and_announced_as_a_gap() -> None:
    buf, pub, fwd = await _setup()
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "denied", 1)
    await _append(buf, "ok", 2)
    await fwd.forward_once()
    assert buf.stats().records == 0  # the denied record left the buffer only as a letter
    [letter] = await fwd.dead_letters.all()
    assert (letter.device, letter.first_seq, letter.reason, letter.code, letter.tries) == (
        "denied",
        1,
        "Not authorized",
        0x87,
        1,
    )
    await _append(buf, "ok", 3)
    await fwd.forward_once()
    bodies = _bodies(pub)
    assert [b.samples[0].seq for b in bodies] == [2, 3]
    assert bodies[0].gaps is None
    assert bodies[1].gaps is not None
    assert [(g.first_seq, g.last_seq, g.count, g.reason) for g in bodies[1].gaps] == [
        (1, 1, 1, "dead_letter")
    ]
    # Announced once: the next message carries no notice, the store knows it was sent.
    await _append(buf, "ok", 4)
    await fwd.forward_once()
    assert _bodies(pub)[2].gaps is None
    assert [d.announced for d in await fwd.dead_letters.all()] == [True]


async def test_dead_letter_notice_is_repeated_until_acked() -> None:
    buf, pub, fwd = await _setup()
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "denied", 1)
    await fwd.forward_once()
    await _append(buf, "ok", 2)
    pub.fail_next(1, "disconnected before ack")
    await fwd.forward_once()  # the carrier is lost: the notice stays
    await fwd.forward_once()
    [body] = _bodies(pub)
    assert body.gaps is not None
    assert body.gaps[0].reason == "dead_letter"


async def test_dead_letter_notice_survives_a_restart(tmp_path: Path) -> None:
    store = DeadLetters(str(tmp_path / "dl.sqlite"))
    buf, pub, fwd = await _setup(dead_letters=store)
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "denied", 1, 3)
    await fwd.forward_once()
    store.close()
    # A new agent process: a fresh forwarder on the same store announces the gap.
    store = DeadLetters(str(tmp_path / "dl.sqlite"))
    buf, pub, fwd = await _setup(dead_letters=store)
    await _append(buf, "ok", 4)
    await fwd.forward_once()
    [body] = _bodies(pub)
    assert body.gaps is not None
    assert [(g.first_seq, g.last_seq, g.count) for g in body.gaps] == [(1, 3, 3)]
    store.close()


async def test_every_dead_letter_is_logged_once_per_device_and_reason() -> None:
    buf, pub, fwd = await _setup()
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    with capture_logs() as logs:
        for seq in range(1, 6):
            await _append(buf, "denied", seq)
            await fwd.forward_once()
    assert fwd.stats.dead_lettered_records == 5
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["device"], e["first_seq"]) for e in errors] == [
        ("forward.dead_letter", "denied", 1)
    ]


async def test_encoder_raising_dead_letters_that_record_and_others_flow() -> None:
    buf, pub, fwd = await _setup()
    assert isinstance(fwd.encoder, _Encoder)
    fwd.encoder.poisoned.add("bad")
    await _append(buf, "bad", 1)
    await _append(buf, "good", 2)
    await fwd.forward_once()
    assert [b.samples[0].seq for b in _bodies(pub)] == [2]
    [letter] = await fwd.dead_letters.all()
    assert letter.reason == "cannot encode: OverflowError: timestamp out of range"
    assert fwd.stats.dead_lettered_by_reason == {"cannot encode: OverflowError": 1}
    assert buf.stats().records == 0


async def test_topic_paho_rejects_is_dead_lettered_at_once() -> None:
    buf, pub, fwd = await _setup()
    await _append(buf, "a+b", 1)
    await _append(buf, "ok", 2)
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert (letter.device, letter.tries) == ("a+b", 1)
    assert letter.reason.startswith("invalid message:")
    assert [b.samples[0].seq for b in _bodies(pub)] == [2]


async def test_transient_refusal_backs_off_only_that_device_and_keeps_its_order() -> None:
    buf, pub, fwd = await _setup(device_backoff_min_s=3600, device_backoff_max_s=3600)
    pub.refuse_topic("edge/gw/busy", "Quota exceeded", 0x97)
    await _append(buf, "busy", 1)
    await _append(buf, "ok", 2)
    await fwd.forward_once()
    assert set(fwd.stats.backing_off) == {"busy"}
    assert fwd.stats.backing_off["busy"].code == 0x97
    pub.refuse_topic("edge/gw/busy", None)
    # While it backs off, its newer records wait behind the refused one; others flow.
    for seq in range(3, 13, 2):
        await _append(buf, "busy", seq)
        await _append(buf, "ok", seq + 1)
        await fwd.forward_once()
    assert [b.samples[0].seq for b in _bodies(pub)] == [2, 4, 6, 8, 10, 12]
    assert [r.first_seq for r in await buf.take(100)] == [1, 3, 5, 7, 9, 11]
    # Backoff over: first the refused record alone (a probe), then the rest, in order.
    fwd.stats.backing_off["busy"].retry_at = 0
    await fwd.forward_once()
    assert [b.samples[0].seq for b in _bodies(pub)][6:] == [1]
    await fwd.forward_once()
    assert [b.samples[0].seq for b in _bodies(pub)][6:] == [1, 3, 5, 7, 9, 11]
    assert fwd.stats.backing_off == {}
    assert buf.stats().records == 0
    assert fwd.stats.dead_lettered_records == 0


async def test_idle_forwarder_wakes_when_a_device_backoff_ends() -> None:
    buf, pub, fwd = await _setup(device_backoff_min_s=0.05, device_backoff_max_s=0.05)
    pub.refuse_topic("edge/gw/busy", "Quota exceeded", 0x97)
    await _append(buf, "busy", 1)
    await fwd.forward_once()
    pub.refuse_topic("edge/gw/busy", None)
    assert not await fwd.forward_once()  # backing off: nothing to send now
    fwd._next_replay_check = float("inf")
    await fwd._idle()  # returns when the backoff ends (no new record arrives)
    assert await fwd.forward_once()
    assert [b.samples[0].seq for b in _bodies(pub)] == [1]


async def test_oversize_batch_is_split_with_exact_seq_ranges() -> None:
    buf, pub, fwd = await _setup()
    pub.max_packet_size = 4096
    await _append(buf, "big", 1, 200)
    await _append(buf, "small", 201)
    await fwd.forward_once()
    bodies = _bodies(pub)
    assert all(packet_size(m) <= 4096 for m in pub.published)
    big = [b for b in bodies if b.device == "big"]
    assert len(big) > 1
    seqs = [s.seq for b in big for s in b.samples]
    assert seqs == list(range(1, 201))
    assert [b.device for b in bodies][-1] == "small"
    assert buf.stats().records == 0
    assert fwd.stats.split_records == 1
    assert fwd.stats.split_parts == len(big)
    assert fwd.stats.dead_lettered_records == 0


async def test_a_single_sample_larger_than_the_limit_is_dead_lettered() -> None:
    buf, pub, fwd = await _setup(max_message_bytes=150)
    await _append(buf, "big", 1)
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert letter.code == 0x95
    assert letter.reason.startswith("too large: one sample needs a")
    assert pub.published == []


async def test_broker_refusing_as_too_large_makes_the_next_attempt_split() -> None:
    # The publisher learnt no limit, the broker refuses with 0x95: split and send again.
    buf, pub, fwd = await _setup()
    await _append(buf, "big", 1, 100)
    pub.fail_next(1, "Packet too large", 0x95)
    await fwd.forward_once()
    await fwd.forward_once()
    seqs = [s.seq for b in _bodies(pub) for s in b.samples]
    assert seqs == list(range(1, 101))
    assert len(pub.published) >= 2
    assert buf.stats().records == 0


@pytest.mark.parametrize(("count", "n"), [(2, 2), (3, 2), (7, 3), (64, 5), (101, 4), (3, 9)])
def test_pieces_cover_the_record_exactly(count: int, n: int) -> None:
    samples = [wire_sample("d", s) for s in range(10, 10 + count)]
    data = orjson.dumps([dict(s) for s in samples])
    record = Record(1, "d", 10, 9 + count, count, 0.0, data)
    pieces = _pieces(record, n)
    assert len(pieces) == min(n, count)
    assert pieces[0].first_seq == 10
    assert pieces[-1].last_seq == 9 + count
    for a, b in itertools.pairwise(pieces):
        assert b.first_seq == a.last_seq + 1
    assert max(p.count for p in pieces) - min(p.count for p in pieces) <= 1
    assert sum(p.count for p in pieces) == count
    assert [s for p in pieces for s in record_samples(p.data)] == orjson.loads(data)
    for p in pieces:
        assert [s["seq"] for s in record_samples(p.data)] == list(
            range(p.first_seq, p.last_seq + 1)
        )


async def test_replay_publishes_dead_letters_with_their_seqs(tmp_path: Path) -> None:
    store = DeadLetters(str(tmp_path / "dl.sqlite"))
    buf, pub, fwd = await _setup(dead_letters=store)
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "denied", 1, 2)
    await _append(buf, "denied", 3)
    await fwd.forward_once()
    assert await fwd.replay_once() == 0  # nothing queued
    pub.refuse_topic("edge/gw/denied", None)  # the ACL was fixed
    # `edge-agent deadletter replay` runs in another process, on its own connection.
    other = DeadLetters(str(tmp_path / "dl.sqlite"))
    assert await other.request_replay(None, device="denied") == 2
    other.close()
    await fwd._replay_if_due()
    bodies = _bodies(pub)
    assert [[s.seq for s in b.samples] for b in bodies] == [[1, 2], [3]]
    assert all(b.historical for b in bodies)
    assert await store.all() == []
    assert fwd.stats.replayed_samples == 3
    store.close()


async def test_replay_refused_again_stays_a_dead_letter() -> None:
    buf, pub, fwd = await _setup()
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "denied", 1)
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert await fwd.dead_letters.request_replay([letter.id]) == 1
    assert await fwd.replay_once() == 0
    [again] = await fwd.dead_letters.all()
    assert (again.id, again.tries, again.replay) == (letter.id, 2, False)


async def test_dead_letter_store_is_bounded_in_bytes_dropping_the_oldest(tmp_path: Path) -> None:
    store = DeadLetters(str(tmp_path / "dl.sqlite"), max_bytes=1000)
    records = [
        Record(i, "d", i, i, 1, 0.0, orjson.dumps([{"seq": i, "pad": "x" * 280}]))
        for i in range(1, 6)
    ]
    with capture_logs() as logs:
        for r in records:
            await store.add(r, "Not authorized", 0x87, 1)
    stats = store.stats()
    assert [d.first_seq for d in await store.all()] == [3, 4, 5]
    assert stats.bytes <= 1000
    assert stats.entries == 3
    assert (stats.dropped_records, stats.dropped_samples) == (2, 2)
    assert [(e["event"], e["records"]) for e in logs] == [
        ("deadletter.dropped", 1),
        ("deadletter.dropped", 1),
    ]
    # One entry larger than the whole bound is still kept (it is the newest).
    await store.add(Record(9, "d", 9, 9, 1, 0.0, b"[" + b"0," * 800 + b"0]"), "x", None, 1)
    assert [d.first_seq for d in await store.all()] == [9]
    store.close()


class _BrokenStore(DeadLetters):
    broken = True

    async def add(self, record: Record, reason: str, code: int | None, tries: int) -> int:
        if self.broken:
            raise OSError(28, "No space left on device")
        return await super().add(record, reason, code, tries)


async def test_a_failing_dead_letter_store_keeps_the_record_and_backs_off_the_device() -> None:
    store = _BrokenStore(None)
    buf, pub, fwd = await _setup(dead_letters=store)
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "denied", 1)
    await _append(buf, "ok", 2)
    with capture_logs() as logs:
        await fwd.forward_once()
    assert [r.device for r in await buf.take(10)] == ["denied"]  # nothing lost
    assert set(fwd.stats.backing_off) == {"denied"}
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["forward.dead_letter.failed"]
    assert [b.samples[0].seq for b in _bodies(pub)] == [2]
    store.broken = False
    await fwd.forward_once()
    assert buf.stats().records == 0
    assert [d.first_seq for d in await store.all()] == [1]


async def test_heartbeat_advances_while_the_broker_is_down() -> None:
    _buf, pub, fwd = await _setup(replay_check_s=0.01)
    pub.set_connected(False)
    task = asyncio.create_task(fwd.run())
    try:
        first = fwd.heartbeat
        async with asyncio.timeout(5):
            while fwd.heartbeat == first:
                await asyncio.sleep(0.01)
    finally:
        fwd.request_stop()
        await task


async def test_many_dead_letters_are_announced_as_one_range_per_device() -> None:
    buf, pub, fwd = await _setup()
    pub.refuse_topic("edge/gw/a", "Not authorized", 0x87)
    pub.refuse_topic("edge/gw/b", "Not authorized", 0x87)
    seq = 0
    for _ in range(50):  # nothing is delivered meanwhile: the notices pile up
        for device in ("a", "b"):
            seq += 1
            await _append(buf, device, seq)
        await fwd.forward_once()
    await _append(buf, "ok", 101)
    await fwd.forward_once()
    [body] = _bodies(pub)
    assert body.gaps is not None
    assert [(g.first_seq, g.last_seq, g.count, g.reason) for g in body.gaps] == [
        (1, 99, 50, "dead_letter"),
        (2, 100, 50, "dead_letter"),
    ]
    assert all(d.announced for d in await fwd.dead_letters.all())


async def test_encoder_returning_garbage_is_a_dead_letter() -> None:
    class Garbage(_Encoder):
        def encode(self, record: Record, *, historical: bool = False, gaps: Any = ()) -> Any:
            return [b"not a message"] if record.device == "bad" else super().encode(record)

    buf, pub, fwd = await _setup()
    fwd.encoder = Garbage(AgentSection(id="gw"), MqttConfig.model_validate({}))
    fwd.encoder.poisoned = set()
    await _append(buf, "bad", 1)
    await _append(buf, "ok", 2)
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert letter.reason == "cannot encode: the encoder returned a bytes, not a Message"
    assert len(pub.published) == 1


async def test_a_split_record_stays_until_every_part_was_acknowledged() -> None:
    buf, pub, fwd = await _setup()
    pub.max_packet_size = 4096
    await _append(buf, "big", 1, 200)
    pub.fail_next(1, "disconnected before ack")  # the first part is lost
    await fwd.forward_once()
    assert [r.first_seq for r in await buf.take(10)] == [1]  # kept whole
    first_try = len(pub.published)
    await fwd.forward_once()
    assert buf.stats().records == 0
    again = [s.seq for b in _bodies(pub)[first_try:] for s in b.samples]
    assert again == list(range(1, 201))  # sent again in full, oldest first


async def test_only_the_samples_the_encoder_fails_on_are_set_aside() -> None:
    class FailsOnSeq7(_Encoder):
        def encode(
            self, record: Record, *, historical: bool = False, gaps: Any = ()
        ) -> list[Message]:
            if any(s["seq"] == 7 for s in record_samples(record.data)):
                raise OverflowError("date value out of range")
            return super().encode(record, historical=historical, gaps=gaps)

    buf, pub, fwd = await _setup()
    fwd.encoder = FailsOnSeq7(AgentSection(id="gw"), MqttConfig.model_validate({}))
    fwd.encoder.poisoned = set()
    await _append(buf, "d", 1, 10)
    await fwd.forward_once()
    delivered = [s.seq for b in _bodies(pub) for s in b.samples]
    assert delivered == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    [letter] = await fwd.dead_letters.all()
    assert (letter.first_seq, letter.last_seq, letter.count) == (7, 7, 1)
    assert [s["seq"] for s in record_samples(letter.data)] == [7]
    assert buf.stats().records == 0
    assert fwd.stats.samples_delivered == 9
    await _append(buf, "d", 11)
    await fwd.forward_once()
    gaps = _bodies(pub)[-1].gaps
    assert gaps is not None
    assert [(g.first_seq, g.last_seq, g.reason) for g in gaps] == [(7, 7, "dead_letter")]


async def test_one_oversize_sample_is_set_aside_and_the_rest_of_its_batch_delivered() -> None:
    buf, pub, fwd = await _setup(max_message_bytes=2048)
    samples = [wire_sample("d", s, tag=f"t{s}") for s in range(1, 9)]
    samples[4] = {**samples[4], "value": "x" * 5000}
    await buf.append("d", samples)
    await fwd.forward_once()
    assert [s.seq for b in _bodies(pub) for s in b.samples] == [1, 2, 3, 4, 6, 7, 8]
    [letter] = await fwd.dead_letters.all()
    assert (letter.first_seq, letter.count, letter.code) == (5, 1, 0x95)
    assert buf.stats().records == 0


async def test_a_record_the_encoder_fails_on_entirely_is_one_dead_letter() -> None:
    buf, pub, fwd = await _setup()
    assert isinstance(fwd.encoder, _Encoder)
    fwd.encoder.poisoned.add("bad")
    await _append(buf, "bad", 1, 64)
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert (letter.first_seq, letter.last_seq, letter.count) == (1, 64, 64)
    assert pub.published == []


async def test_a_device_with_one_bad_sample_per_poll_is_logged_once() -> None:
    class FailsOnTagBad(_Encoder):
        def encode(
            self, record: Record, *, historical: bool = False, gaps: Any = ()
        ) -> list[Message]:
            if any(s["tag"] == "bad" for s in record_samples(record.data)):
                raise OverflowError("date value out of range")
            return super().encode(record, historical=historical, gaps=gaps)

    buf, _pub, fwd = await _setup()
    fwd.encoder = FailsOnTagBad(AgentSection(id="gw"), MqttConfig.model_validate({}))
    fwd.encoder.poisoned = set()
    with capture_logs() as logs:
        for poll in range(5):
            seq = 1 + 2 * poll
            await buf.append(
                "d", [wire_sample("d", seq, tag="good"), wire_sample("d", seq + 1, tag="bad")]
            )
            await fwd.forward_once()
    assert fwd.stats.dead_lettered_samples == 5
    assert fwd.stats.samples_delivered == 5
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["forward.dead_letter"]


async def test_poison_snapshot_shows_backoff_dead_letters_and_the_store() -> None:
    buf, pub, fwd = await _setup(device_backoff_min_s=60, device_backoff_max_s=60)
    pub.refuse_topic("edge/gw/busy", "Quota exceeded", 0x97)
    pub.refuse_topic("edge/gw/denied", "Not authorized", 0x87)
    await _append(buf, "busy", 1)
    await _append(buf, "denied", 2, 3)
    await fwd.forward_once()
    snap = fwd.poison_snapshot()
    assert snap.dead_lettered_by_reason == {"Not authorized": 1}
    assert (snap.dead_lettered_records, snap.dead_lettered_samples) == (1, 3)
    [(device, (reason, code, refusals, retry_in_s))] = snap.backing_off.items()
    assert (device, reason, code, refusals) == ("busy", "Quota exceeded", 0x97, 1)
    assert 0 < retry_in_s <= 60
    assert (snap.store.entries, snap.store.samples, snap.store_path) == (1, 3, None)


async def test_tag_layout_sets_aside_only_the_tag_whose_topic_is_refused() -> None:
    buf, pub, fwd = await _setup()
    fwd.encoder = _Encoder(
        AgentSection(id="gw"),
        MqttConfig.model_validate({"layout": "tag", "topic_tag": "edge/gw/{device}/{tag}"}),
    )
    fwd.encoder.poisoned = set()
    pub.refuse_topic("edge/gw/d/t2", "Not authorized", 0x87)
    await _append(buf, "d", 1, 4)  # tags t1..t4, seqs 1..4
    await fwd.forward_once()  # t2 refused, the others acked: find out which sample
    assert buf.stats().records == 1
    await fwd.forward_once()  # one part per sample: only t2 is set aside
    assert buf.stats().records == 0
    [letter] = await fwd.dead_letters.all()
    assert (letter.first_seq, letter.count, letter.code) == (2, 1, 0x87)
    delivered = {orjson.loads(m.payload)["seq"] for m in pub.published}
    assert delivered == {1, 3, 4}
    assert fwd.stats.samples_delivered == 3


async def test_a_probe_refused_again_lets_no_later_record_of_its_device_through() -> None:
    buf, pub, fwd = await _setup(device_backoff_min_s=3600, device_backoff_max_s=3600)
    pub.refuse_topic("edge/gw/busy", "Quota exceeded", 0x97)
    await _append(buf, "busy", 1)
    await fwd.forward_once()
    await _append(buf, "busy", 2)
    await _append(buf, "busy", 3)
    fwd.stats.backing_off["busy"].retry_at = 0
    await fwd.forward_once()  # the probe (seq 1) is refused again
    refused = [a.message for a in pub.attempts if not a.result.ok]
    assert [b.samples[0].seq for b in batches(refused)] == [1, 1]
    assert pub.published == []
    assert fwd.stats.backing_off["busy"].refusals == 2


async def test_sparkplug_batch_is_split_before_encoding_so_its_dbirth_goes_out() -> None:
    from agent.config import SparkplugConfig

    buf, pub, fwd = await _setup()
    cfg = MqttConfig(layout="sparkplug", sparkplug=SparkplugConfig(group_id="plant"))
    fwd.encoder = PayloadEncoder(AgentSection(id="gw"), cfg)
    pub.max_packet_size = 8192
    # Samples alone larger than the limit (the stored record is compact: text values that
    # compression cannot shrink make it so).
    samples = [wire_sample("press", s, tag=f"t{s}") for s in range(1, 101)]
    for s in samples:
        s["value"] = pad_text(s["seq"], 100)
    await buf.append("press", samples)
    await fwd.forward_once()
    kinds = [m.topic.split("/")[2] for m in pub.published]
    assert kinds[0] == "DBIRTH"  # the device is declared before its first DDATA
    assert kinds.count("DDATA") > 1  # split
    assert all(packet_size(m) <= 8192 for m in pub.published)
    assert buf.stats().records == 0
    assert fwd.stats.dead_lettered_records == 0


async def test_a_record_refused_sample_by_sample_is_still_one_dead_letter() -> None:
    buf, pub, fwd = await _setup()
    fwd.encoder = _Encoder(
        AgentSection(id="gw"),
        MqttConfig.model_validate({"layout": "tag", "topic_tag": "edge/gw/{device}/{tag}"}),
    )
    fwd.encoder.poisoned = set()
    pub.refuse_topic("edge/gw/d/t2", "Not authorized", 0x87)
    await _append(buf, "d", 1, 3)
    await fwd.forward_once()  # mixed: t2 refused → sent one part per sample next
    for tag in ("t1", "t3"):
        pub.refuse_topic(f"edge/gw/d/{tag}", "Not authorized", 0x87)  # now all are denied
    await fwd.forward_once()
    [letter] = await fwd.dead_letters.all()
    assert (letter.first_seq, letter.last_seq, letter.count) == (1, 3, 3)
    assert buf.stats().records == 0
