"""The per-poll hot path: columns from the driver, the normaliser's all-good path, the
batch encoder's fast seq check, `append_many`, and the runtime's buffer writer (order,
backpressure, flush on stop)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.buffer.common import encode_batch, record_samples
from agent.buffer.memory import MemoryBuffer
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig, parse_config
from agent.normalize import Columns, Normalizer, SeqCounter
from agent.publish.fake import FakePublisher
from agent.runtime import WRITE_BATCH_MAX, WRITE_QUEUE_MAX, Agent
from agent.schema import WireSample
from drivers.base import RawReading, TagCommon
from tests.support.samples import make_samples

TS = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TAGS = [
    TagCommon(name="a"),
    TagCommon(name="b", scale=0.1, offset=2.0, unit="bar"),
    TagCommon(name="c", unit="°C"),
]


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        ([1, 20, 3.5], {}),
        ([True, [1, 2], "x"], {}),
        ([1, None, 3], {1: RawReading("b", None, "bad", "illegal data address", 2)}),
        (
            [None, None, None],
            {i: RawReading(t, None, "bad", "not read") for i, t in enumerate("abc")},
        ),
    ],
)
def test_columns_give_the_same_samples_as_readings(
    values: list[object], bad: dict[int, RawReading]
) -> None:
    columns = Columns(["a", "b", "c"], values, bad)  # type: ignore[arg-type]
    by_columns = Normalizer("plc", TAGS).samples(columns, TS, SeqCounter(10))
    by_readings = Normalizer("plc", TAGS).samples(columns.readings(), TS, SeqCounter(10))
    assert by_columns == by_readings
    assert [s["seq"] for s in by_columns] == [11, 12, 13]
    # Any other consumer sees RawReadings.
    assert len(columns) == 3
    assert list(columns) == columns.readings()
    assert columns[-1] == columns[2] == columns[1:][1]
    assert all(isinstance(r, RawReading) for r in columns)


def test_encode_batch_fast_path_matches_and_still_refuses() -> None:
    samples = make_samples(5, 4)
    batch = encode_batch(samples, 4)
    assert (batch.first_seq, batch.last_seq, batch.count) == (5, 8, 4)
    assert record_samples(batch.full)[3]["seq"] == 8
    gappy = make_samples(5, 1) + make_samples(9, 2)  # increasing, not consecutive: fine
    assert encode_batch(gappy, 0).last_seq == 10
    for seqs in ([5, 5], [6, 5], [5.0, 6.0], [True, 2], [5, 7, 6]):
        bad = make_samples(1, len(seqs))
        for s, seq in zip(bad, seqs, strict=True):
            s["seq"] = seq  # type: ignore[typeddict-item]
        with pytest.raises(ValueError, match="strictly increasing"):
            encode_batch(bad, 0)
    with pytest.raises(ValueError, match="not above 4"):
        encode_batch(make_samples(4, 2), 4)


async def test_append_many_keeps_order_and_reports_each_failure(tmp_path: Path) -> None:
    buf = SqliteBuffer(BufferConfig.model_validate({"path": str(tmp_path / "buf.db")}))
    await buf.open()
    try:
        errors = await buf.append_many(
            [
                ("press1", make_samples(1, 2)),
                ("oven", make_samples(2, 1, device="oven")),  # seq 2 reused: refused
                ("oven", []),
                ("oven", make_samples(3, 3, device="oven")),
            ]
        )
        assert [type(e) for e in errors] == [type(None), ValueError, type(None), type(None)]
        recs = await buf.take(10)
        assert [(r.device, r.first_seq, r.last_seq) for r in recs] == [
            ("press1", 1, 2),
            ("oven", 3, 5),
        ]
        assert buf.last_seq() == 5
    finally:
        await buf.close()


class GatedBuffer(MemoryBuffer):
    """A memory buffer whose appends wait for `gate`, and record their order."""

    def __init__(self) -> None:
        super().__init__(BufferConfig(kind="memory"))
        self.gate = asyncio.Event()
        self.order: list[tuple[str, int]] = []

    async def append(self, device: str, samples: Sequence[WireSample]) -> None:
        await self.gate.wait()
        self.order.append((device, samples[0]["seq"]))
        await super().append(device, samples)


def one_device_config(tmp_path: Path) -> str:
    return f"""\
agent: {{id: gw}}
buffer: {{kind: memory, path: {tmp_path / "unused.db"}}}
devices:
  - name: plc
    protocol: modbus
    host: 127.0.0.1
    port: 1
    tags:
      - {{name: a, address: 0, type: uint16}}
"""


async def test_writer_waits_when_full_loses_nothing_and_flushes_on_stop(
    tmp_path: Path,
) -> None:
    buffer = GatedBuffer()
    await buffer.open()
    agent = Agent(
        parse_config(one_device_config(tmp_path)), publisher=FakePublisher(), buffer=buffer
    )
    seq = SeqCounter(0)  # one per agent, shared by the devices
    made = {
        d: agent.writer.sink(d, Normalizer(d, [TagCommon(name="a")]), seq) for d in ("plc", "oven")
    }
    sinks = [made[d][0] for d in ("plc", "oven")]
    writer = asyncio.create_task(agent.writer.run())
    polls = WRITE_QUEUE_MAX + WRITE_BATCH_MAX + 3  # the writer holds one batch
    # More polls than the queue holds while the buffer is stuck: the last ones wait.
    puts = [asyncio.ensure_future(sinks[i % 2]([RawReading("a", i)])) for i in range(polls)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not all(p.done() for p in puts)  # backpressure, not a drop
    assert agent.status.samples_produced == 0
    buffer.gate.set()
    # One more arriving while the waiting ones resume must not overtake their seqs.
    puts.append(asyncio.ensure_future(sinks[0]([RawReading("a", polls)])))
    await asyncio.gather(*puts)
    await agent.writer.stop()  # what run() does once the pollers stopped
    await writer
    assert [s for _, s in buffer.order] == list(range(1, polls + 2))
    assert agent.status.samples_produced == polls + 1
    assert agent.status.samples_dropped_on_error == 0
    # The newest sample stored per device is the one the status page shows.
    newest = {dev: s for dev, s in buffer.order}
    assert {d: made[d][1]["a"]["seq"] for d in ("plc", "oven")} == newest


async def test_writer_counts_and_logs_a_failing_append(tmp_path: Path) -> None:
    buffer = MemoryBuffer(BufferConfig(kind="memory"))
    await buffer.open()
    agent = Agent(
        parse_config(one_device_config(tmp_path)), publisher=FakePublisher(), buffer=buffer
    )
    sink, _ = agent.writer.sink("plc", Normalizer("plc", [TagCommon(name="a")]), SeqCounter(0))
    writer = asyncio.create_task(agent.writer.run())
    await sink([RawReading("a", 1)])
    # A second counter reuses seq 1: the buffer refuses it, the writer goes on.
    bad, _ = agent.writer.sink("plc", Normalizer("plc", [TagCommon(name="a")]), SeqCounter(0))
    await bad([RawReading("a", 2)])
    await sink([RawReading("a", 3)])
    await agent.writer.stop()
    await writer
    assert agent.status.samples_produced == 2
    assert agent.status.samples_dropped_on_error == 1
    assert [r.first_seq for r in await buffer.take(10)] == [1, 2]


async def test_writer_keeps_and_retries_polls_when_the_append_raises(tmp_path: Path) -> None:
    """An append that raises (a disk hiccup the buffer did not absorb) loses nothing: the
    polls in hand are tried again, in order, and stored once the buffer works."""
    from structlog.testing import capture_logs

    from tests.support.faults import FaultPlan, Faulty, Raise

    plan = FaultPlan().at("append_many", 1, Raise(OSError(5, "Input/output error")), times=3)
    inner = SqliteBuffer(BufferConfig(path=str(tmp_path / "b.db")))
    await inner.open()
    buffer = Faulty(inner, plan)
    agent = Agent(
        parse_config(one_device_config(tmp_path)), publisher=FakePublisher(), buffer=buffer
    )
    sink, _ = agent.writer.sink("plc", Normalizer("plc", [TagCommon(name="a")]), SeqCounter(0))
    with capture_logs() as logs:
        writer = asyncio.create_task(agent.writer.run())
        for v in range(5):
            await sink([RawReading("a", v)])
        await agent.writer.stop()
        await writer
    assert [m for m, _, _ in plan.fired] == ["append_many"] * 3
    assert agent.writer.retries == 3
    assert agent.status.samples_dropped_on_error == 0
    assert agent.status.buffer_error is None  # recovered
    records = await inner.take(10)
    assert [s["value"] for r in records for s in record_samples(r.data)] == [0, 1, 2, 3, 4]
    events = [e["event"] for e in logs if e["event"].startswith("buffer.append")]
    assert events == ["buffer.append.retrying", "buffer.append.recovered"]
    await inner.close()
