"""The buffer contract, run against both implementations (SQLite and memory)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import pytest
from structlog.testing import capture_logs

from agent.buffer import Buffer
from agent.buffer.common import Gap, open_buffer, record_samples
from agent.buffer.memory import MemoryBuffer
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from agent.schema import Sample
from tests.support.samples import MIB, counted, make_samples, names, size_of

Kind = Literal["sqlite", "memory"]
Buf = SqliteBuffer | MemoryBuffer
Factory = Callable[..., Awaitable[Buf]]


@pytest.fixture(params=["sqlite", "memory"])
def kind(request: pytest.FixtureRequest) -> Kind:
    k: Kind = request.param
    return k


@pytest.fixture
async def make(kind: Kind, tmp_path: Path) -> AsyncIterator[Factory]:
    """Opens buffers of the parametrised kind on one path; closes them all at the end."""
    opened: list[Buf] = []

    async def factory(
        max_bytes: int = 64 * MIB,
        when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
    ) -> Buf:
        cfg = BufferConfig(
            kind=kind,
            path=str(tmp_path / "sub" / "buf.db"),
            max_bytes=max_bytes,
            when_full=when_full,
        )
        buf = SqliteBuffer(cfg) if kind == "sqlite" else MemoryBuffer(cfg)
        await buf.open()
        opened.append(buf)
        return buf

    yield factory
    for buf in opened:
        await buf.close()


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def sqlite_config(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig.model_validate({"path": str(tmp_path / "buf.db"), **kw})


async def test_append_take_commit_in_order(make: Factory) -> None:
    buf = await make()
    await buf.append("press1", make_samples(1, 3))
    await buf.append("oven", make_samples(4, 2, device="oven"))
    await buf.append("press1", make_samples(6, 1))
    recs = await buf.take(10)
    assert [(r.device, r.first_seq, r.last_seq, r.count) for r in recs] == [
        ("press1", 1, 3, 3),
        ("oven", 4, 5, 2),
        ("press1", 6, 6, 1),
    ]
    ids = [r.id for r in recs]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    # The data is the wire form: it validates as Samples, timestamps in UTC with Z.
    decoded = record_samples(recs[0].data)
    assert [Sample.model_validate(d).seq for d in decoded] == [1, 2, 3]
    assert decoded[0]["ts_agent"] == "2024-05-01T12:00:00Z"
    # take does not remove; commit deletes exactly the given ids, unknown ones ignored.
    assert [r.id for r in await buf.take(10)] == ids
    await buf.commit([ids[1], 999_999])
    assert [r.id for r in await buf.take(10)] == [ids[0], ids[2]]
    await buf.commit([ids[0], ids[2]])
    assert await buf.take(10) == []


async def test_take_after_id_and_limit(make: Factory) -> None:
    buf = await make()
    for i in range(5):
        await buf.append("press1", make_samples(1 + i, 1))
    ids = [r.id for r in await buf.take(10)]
    assert [r.id for r in await buf.take(2)] == ids[:2]
    assert [r.id for r in await buf.take(2, after_id=ids[1])] == ids[2:4]
    assert [r.id for r in await buf.take(10, after_id=ids[3])] == ids[4:]
    assert await buf.take(10, after_id=ids[4]) == []
    assert await buf.take(0) == []
    # after_id works across committed holes too.
    await buf.commit(ids[1:3])
    assert [r.id for r in await buf.take(10, after_id=ids[0])] == [ids[3], ids[4]]


async def test_ids_never_reused_after_delete(make: Factory) -> None:
    buf = await make()
    await buf.append("press1", make_samples(1, 1))
    first = (await buf.take(1))[0].id
    await buf.commit([first])
    await buf.append("press1", make_samples(2, 1))
    assert (await buf.take(1))[0].id > first


async def test_wait_wakes_on_append(make: Factory) -> None:
    buf = await make()
    waiter = asyncio.create_task(buf.wait(0))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done()
    await buf.append("press1", make_samples(1, 1))
    async with asyncio.timeout(10):
        await waiter
    # A record above after_id exists: returns at once; none above: waits for the next.
    rid = (await buf.take(1))[0].id
    async with asyncio.timeout(10):
        await buf.wait(rid - 1)
    waiter = asyncio.create_task(buf.wait(rid))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done()
    await buf.append("press1", make_samples(2, 1))
    async with asyncio.timeout(10):
        await waiter


async def test_wait_does_not_count_committed_records(make: Factory) -> None:
    buf = await make()
    await buf.append("press1", make_samples(1, 1))
    await buf.append("press1", make_samples(2, 1))
    a, b = await buf.take(2)
    await buf.commit([b.id])
    waiter = asyncio.create_task(buf.wait(a.id))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_seq_must_increase(make: Factory) -> None:
    buf = await make()
    await buf.append("press1", make_samples(5, 2))
    assert buf.last_seq() == 6
    with pytest.raises(ValueError, match="strictly increasing"):
        await buf.append("press1", make_samples(6, 1))
    bad = make_samples(7, 2)
    bad[1]["seq"] = 7
    with pytest.raises(ValueError, match="strictly increasing"):
        await buf.append("press1", bad)
    await buf.append("press1", [])  # nothing to store, not an error
    assert buf.last_seq() == 6
    assert [r.last_seq for r in await buf.take(10)] == [6]
    assert buf.stats().samples == 2


async def test_concurrent_appends_are_serialised(make: Factory) -> None:
    buf = await make()
    # Seqs are handed out in call order, as a seq allocator followed by append would do.
    await asyncio.gather(
        *(
            buf.append(f"dev{i % 7}", make_samples(1 + 3 * i, 3, device=f"dev{i % 7}"))
            for i in range(60)
        )
    )
    recs = await buf.take(100)
    assert [r.first_seq for r in recs] == [1 + 3 * i for i in range(60)]
    assert buf.last_seq() == 180
    assert buf.stats().samples == 180


async def test_stats(make: Factory, kind: Kind) -> None:
    buf = await make(max_bytes=8 * MIB)
    empty = buf.stats()
    assert (empty.records, empty.samples, empty.bytes, empty.oldest_created) == (0, 0, 0, None)
    assert empty.max_bytes == 8 * MIB
    await buf.append("press1", make_samples(1, 3))
    await buf.append("press1", make_samples(4, 2))
    recs = await buf.take(10)
    st = buf.stats()
    assert st.records == 2
    assert st.samples == 5
    assert st.bytes == sum(counted(kind, r.data) for r in recs)
    assert st.oldest_created == recs[0].created
    assert st.last_seq == 5
    assert st.appended_samples == 5
    await buf.commit([recs[0].id])
    st = buf.stats()
    assert (st.records, st.samples, st.committed_samples) == (1, 2, 3)
    assert st.oldest_created == recs[1].created
    assert st.bytes == counted(kind, recs[1].data)
    assert (st.dropped_samples, st.dropped_records) == (0, 0)


async def test_drop_oldest_keeps_within_limit(make: Factory, kind: Kind) -> None:
    buf = await make(max_bytes=MIB, when_full="drop_oldest")
    per_sample = 20_000
    with capture_logs() as logs:
        seq = 1
        for _ in range(120):  # ~2.4 MB offered to a 1 MiB buffer
            await buf.append("press1", make_samples(seq, 1, pad=per_sample))
            seq += 1
            assert buf.stats().bytes <= MIB
        st = buf.stats()
        recs = await buf.take(1000)
        # The survivors are the newest, contiguous up to the last seq.
        assert recs[-1].last_seq == 120
        assert [r.first_seq for r in recs] == list(range(121 - len(recs), 121))
        assert st.dropped_records == 120 - len(recs)
        assert st.dropped_samples == st.dropped_records
        assert st.records == len(recs)
        assert st.bytes == sum(counted(kind, r.data) for r in recs)
        # The next record would not fit: it is by design the first to go.
        assert st.bytes + counted(kind, recs[0].data) > MIB
        gaps = await buf.take_gaps()
        assert gaps == [Gap(1, st.dropped_records, st.dropped_records, "drop_oldest", buf.epoch)]
        # Delivering frees room: the next append fits and ends the episode.
        await buf.commit([r.id for r in recs[: len(recs) // 2]])
        await buf.append("press1", make_samples(seq, 1, pad=per_sample))
    assert buf.stats().dropped_records == st.dropped_records
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [
        ("buffer.full.dropping", "warning"),
        ("buffer.full.recovered", "info"),
    ]
    assert logs[1]["dropped_samples"] == st.dropped_samples


async def test_drop_newest_refuses(make: Factory) -> None:
    buf = await make(max_bytes=MIB, when_full="drop_newest")
    kept = 0
    for i in range(100):
        before = buf.stats().records
        await buf.append("press1", make_samples(1 + i, 1, pad=20_000))
        kept += buf.stats().records - before
        assert buf.stats().bytes <= MIB
    st = buf.stats()
    recs = await buf.take(1000)
    assert [r.first_seq for r in recs] == list(range(1, kept + 1))
    assert st.dropped_records == 100 - kept
    assert st.dropped_samples == 100 - kept
    assert kept < 100
    # Refused seqs are used up: last_seq covers them and they are reported as a gap.
    assert buf.last_seq() == 100
    assert await buf.take_gaps() == [Gap(kept + 1, 100, 100 - kept, "drop_newest", buf.epoch)]
    with pytest.raises(ValueError, match="strictly increasing"):
        await buf.append("press1", make_samples(100, 1))


async def test_batch_larger_than_limit_is_refused(make: Factory) -> None:
    buf = await make(max_bytes=MIB, when_full="drop_oldest")
    await buf.append("press1", make_samples(1, 1))
    await buf.append("press1", make_samples(2, 60, pad=20_000))  # ~1.2 MB in one batch
    st = buf.stats()
    assert (st.records, st.dropped_records, st.dropped_samples) == (1, 1, 60)
    assert await buf.take_gaps() == [Gap(2, 61, 60, "too_large", buf.epoch)]
    assert buf.last_seq() == 61


async def test_gaps_merge_and_clear(make: Factory) -> None:
    buf = await make(max_bytes=MIB, when_full="drop_newest")
    await buf.append("press1", make_samples(1, 40, pad=25_000))  # ~1 MB, fits
    await buf.append("press1", make_samples(41, 5, pad=25_000))  # refused
    await buf.append("press1", make_samples(46, 5, pad=25_000))  # refused, contiguous
    recs = await buf.take(10)
    await buf.commit([r.id for r in recs])
    await buf.append("press1", make_samples(51, 40, pad=25_000))  # fits again
    await buf.append("press1", make_samples(95, 2, pad=25_000))  # refused, not contiguous
    assert await buf.take_gaps() == [
        Gap(41, 50, 10, "drop_newest", buf.epoch),
        Gap(95, 96, 2, "drop_newest", buf.epoch),
    ]
    await buf.clear_gaps(50)
    assert await buf.take_gaps() == [Gap(95, 96, 2, "drop_newest", buf.epoch)]


async def test_closed_buffer_refuses_appends(make: Factory) -> None:
    buf = await make()
    await buf.close()
    with pytest.raises(RuntimeError, match="not open"):
        await buf.append("press1", make_samples(1, 1))
    await buf.close()  # idempotent, never raises


# ---------------------------------------------------------------- sqlite only


async def test_sqlite_last_seq_survives_reopen_when_all_committed(tmp_path: Path) -> None:
    cfg = sqlite_config(tmp_path)
    buf = SqliteBuffer(cfg)
    await buf.open()
    await buf.append("press1", make_samples(1, 10))
    await buf.append("press1", make_samples(11, 5))
    await buf.commit([r.id for r in await buf.take(10)])
    assert buf.stats().records == 0
    await buf.close()
    again = SqliteBuffer(cfg)
    await again.open()
    try:
        assert again.last_seq() == 15
        assert again.stats().last_seq == 15
        with pytest.raises(ValueError, match="strictly increasing"):
            await again.append("press1", make_samples(15, 1))
        await again.append("press1", make_samples(16, 1))
    finally:
        await again.close()


async def test_sqlite_records_gaps_and_sizes_survive_reopen(tmp_path: Path) -> None:
    cfg = sqlite_config(tmp_path, max_bytes=MIB, when_full="drop_newest")
    buf = SqliteBuffer(cfg)
    await buf.open()
    for i in range(60):
        await buf.append(f"dev{i % 3}", make_samples(1 + i, 1, pad=20_000))
    before = buf.stats()
    recs = await buf.take(100)
    gaps = await buf.take_gaps()
    await buf.close()
    again = SqliteBuffer(cfg)
    await again.open()
    try:
        assert await again.take(100) == recs
        assert await again.take_gaps() == gaps
        after = again.stats()
        assert (after.records, after.samples, after.bytes, after.last_seq) == (
            before.records,
            before.samples,
            before.bytes,
            before.last_seq,
        )
        assert after.oldest_created == recs[0].created
    finally:
        await again.close()


async def test_sqlite_creates_parent_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "buf.db"
    buf = SqliteBuffer(BufferConfig(path=str(path)))
    await buf.open()
    await buf.append("press1", make_samples(1, 1))
    # buf.db.seq: the seq high-water for a disk that fails (see "Disk trouble").
    assert names(path.parent) == ["buf.db", "buf.db-wal", "buf.db.seq"]
    await buf.close()


async def test_sqlite_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    garbage = b"this is not a database " * 500
    path.write_bytes(garbage)
    buf = SqliteBuffer(BufferConfig(path=str(path)))
    with capture_logs() as logs:
        await buf.open()
    try:
        aside = [tmp_path / n for n in names(tmp_path) if n.startswith("buf.db.corrupt-")]
        assert len(aside) == 1
        assert read_bytes(aside[0]) == garbage
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("buffer.corrupt.moved_aside", "error")
        ]
        assert logs[0]["moved_to"] == str(aside[0])
        assert buf.last_seq() == 0
        await buf.append("press1", make_samples(1, 2))
        assert [r.last_seq for r in await buf.take(10)] == [2]
    finally:
        await buf.close()


async def test_sqlite_damaged_pages_are_moved_aside_and_seq_salvaged(tmp_path: Path) -> None:
    cfg = sqlite_config(tmp_path)
    buf = SqliteBuffer(cfg)
    await buf.open()
    for i in range(50):
        await buf.append("press1", make_samples(1 + 10 * i, 10, pad=1000))
    await buf.close()
    # Overwrite pages in the middle of the file (not the header, not page 1's schema):
    # 0xff in a page's first bytes is an impossible page type / overflow page number.
    path = tmp_path / "buf.db"
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(b"\xff" * 8192)
    again = SqliteBuffer(cfg)
    with capture_logs() as logs:
        await again.open()
    try:
        assert [e["event"] for e in logs] == ["buffer.corrupt.moved_aside"]
        assert any(n.startswith("buf.db.corrupt-") for n in names(tmp_path))
        # The high-water mark lives in a small table on its own page: still readable.
        assert again.last_seq() == 500
        await again.append("press1", make_samples(501, 1))
    finally:
        await again.close()


async def test_sqlite_second_open_of_same_file_is_refused(tmp_path: Path) -> None:
    cfg = sqlite_config(tmp_path)
    first = SqliteBuffer(cfg)
    await first.open()
    try:
        await first.append("press1", make_samples(1, 1))
        second = SqliteBuffer(cfg)
        with pytest.raises(RuntimeError, match="in use"):
            await second.open()
        await second.close()
        # Not mistaken for corruption: nothing was moved aside, the data is intact.
        assert not any(".corrupt-" in n for n in names(tmp_path))
        assert len(await first.take(10)) == 1
    finally:
        await first.close()


async def test_sqlite_file_shrinks_after_drain(tmp_path: Path) -> None:
    cfg = sqlite_config(tmp_path, max_bytes=16 * MIB)
    path = tmp_path / "buf.db"
    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        for i in range(200):
            await buf.append("press1", make_samples(1 + i, 1, pad=20_000))
        full = size_of(path) + size_of(f"{path}-wal")
        assert full > 4 * MIB
        while recs := await buf.take(50):
            await buf.commit([r.id for r in recs])
        assert buf.stats().bytes == 0
        assert size_of(path) < 256 * 1024
        assert size_of(f"{path}-wal") == 0
    finally:
        await buf.close()


def test_open_buffer_picks_the_kind(tmp_path: Path) -> None:
    mem: Buffer = open_buffer(BufferConfig(kind="memory"))
    disk: Buffer = open_buffer(sqlite_config(tmp_path))
    assert isinstance(mem, MemoryBuffer)
    assert isinstance(disk, SqliteBuffer)
