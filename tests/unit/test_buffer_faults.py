"""Buffer faults: maximum age, the on-disk size bound, a failing disk (memory fallback and
recovery), and salvage of a damaged file at start."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Literal

import pytest
from structlog.testing import capture_logs

from agent.buffer import Gap, Record
from agent.buffer.memory import MemoryBuffer
from agent.buffer.sqlite import LEASE_BLOCK, SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import MIB, make_samples, names, size_of

Kind = Literal["sqlite", "memory"]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """time.time() under the test's control (both buffers stamp records with it)."""
    c = Clock(1_700_000_000.0)
    monkeypatch.setattr(time, "time", c)
    return c


def config(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig.model_validate({"path": str(tmp_path / "buf.db"), **kw})


async def fill_page_limit(buf: SqliteBuffer, extra_pages: int = 0) -> None:
    """Make the database file unable to grow: SQLite then fails writes with SQLITE_FULL,
    exactly as on a full disk (without needing one)."""

    def limit() -> None:
        con = buf._require_con()
        pages = int(con.execute("PRAGMA page_count").fetchone()[0])
        con.execute(f"PRAGMA max_page_count={pages + extra_pages}")

    await buf._run(limit)


async def lift_page_limit(buf: SqliteBuffer) -> None:
    await buf._run(lambda: buf._require_con().execute("PRAGMA max_page_count=1073741823"))
    buf._next_probe = 0.0  # probe at the next call rather than in PROBE_INTERVAL_S


def seqs_of(records: list[Record]) -> list[int]:
    return [q for r in records for q in range(r.first_seq, r.last_seq + 1)]


# ---------------------------------------------------------------------- max_age


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_max_age_drops_old_records_as_gaps(kind: Kind, tmp_path: Path, clock: Clock) -> None:
    cfg = config(tmp_path, kind=kind, max_age_s=60)
    buf = SqliteBuffer(cfg) if kind == "sqlite" else MemoryBuffer(cfg)
    await buf.open()
    try:
        for i in range(3):
            await buf.append("press1", make_samples(1 + 2 * i, 2))
            clock.now += 10
        clock.now += 35  # the first record is 65 s old, the second 55 s
        with capture_logs() as logs:
            await buf.append("press1", make_samples(7, 1))
            await buf.append("press1", make_samples(8, 1))
        recs = await buf.take(10)
        assert [r.first_seq for r in recs] == [3, 5, 7, 8]
        assert await buf.take_gaps() == [Gap(1, 2, 2, "max_age", buf.epoch)]
        clock.now += 20  # 3..6 are now too old as well: one merged gap
        with capture_logs() as more:
            await buf.append("press1", make_samples(9, 1))
        assert await buf.take_gaps() == [Gap(1, 6, 6, "max_age", buf.epoch)]
        stats = buf.stats()
        assert (stats.dropped_samples, stats.dropped_records, stats.samples) == (6, 3, 3)
        # Logged once for the episode, and its end once delivery moves again.
        assert [e["event"] for e in logs + more] == ["buffer.max_age.dropping"]
        with capture_logs() as end:
            await buf.commit([r.id for r in await buf.take(10)])
        assert [(e["event"], e["dropped_samples"]) for e in end] == [
            ("buffer.max_age.recovered", 6)
        ]
    finally:
        await buf.close()


# ---------------------------------------------------------------------- size on disk


async def test_file_stays_within_limit_and_margin_through_a_long_overflow(
    tmp_path: Path,
) -> None:
    """The documented plan: at most 1.3 × max_bytes + 8 MiB (db + wal), at every point of
    a run that writes 8 × max_bytes through a full buffer with mixed record sizes."""
    max_bytes = 8 * MIB
    margin = int(1.3 * max_bytes) + 8 * MIB
    buf = SqliteBuffer(config(tmp_path, max_bytes=max_bytes))
    path = tmp_path / "buf.db"
    await buf.open()
    try:
        written = seq = worst = 0
        sizes = itertools.cycle([0, 50, 3000, 20_000, 700, 90_000])
        i = 0
        while written < 8 * max_bytes:
            pad = next(sizes)
            n = 1 + i % 7
            await buf.append(f"dev{i % 3}", make_samples(seq + 1, n, pad=pad))
            seq += n
            written += n * (pad + 150)
            i += 1
            # Deliver now and then, as a forwarder that keeps up only partly would.
            if i % 50 == 0:
                recs = await buf.take(5)
                await buf.commit([r.id for r in recs])
            if i % 25 == 0:
                on_disk = size_of(path) + size_of(f"{path}-wal")
                worst = max(worst, on_disk)
                assert buf.stats().bytes <= max_bytes
                assert on_disk <= margin, (i, on_disk, margin)
        assert buf.stats().dropped_samples > 0  # it did overflow
        print(f"worst db+wal {worst} bytes = {worst / max_bytes:.2f} x max_bytes")
    finally:
        await buf.close()


# ---------------------------------------------------------------------- disk trouble


async def test_disk_full_keeps_newest_in_memory_and_recovers(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        await buf.append("press1", make_samples(1, 2))
        await buf.append("press1", make_samples(3, 2))
        await fill_page_limit(buf)
        with capture_logs() as logs:
            for i in range(3):  # each needs a new page: 2000-character values
                await buf.append("oven", make_samples(5 + 2 * i, 2, device="oven", pad=2000))
        assert [(e["event"], e["log_level"], e["reason"]) for e in logs] == [
            ("buffer.disk.failed", "error", "SQLITE_FULL")
        ]
        stats = buf.stats()
        assert (stats.degraded, stats.health, stats.degraded_reason) == (
            True,
            "degraded",
            "SQLITE_FULL",
        )
        assert (stats.records, stats.memory_records, stats.samples) == (5, 3, 10)
        assert buf.last_seq() == 10
        # Memory records come after the disk ones; ids strictly increasing.
        recs = await buf.take(10)
        assert seqs_of(recs) == list(range(1, 11))
        assert [r.id for r in recs] == sorted({r.id for r in recs})
        assert [r.id for r in await buf.take(10, after_id=recs[2].id)] == [r.id for r in recs[3:]]
        # Delivering works meanwhile, for disk and memory records alike.
        await buf.commit([recs[0].id, recs[2].id])
        assert [r.id for r in await buf.take(10)] == [recs[1].id, recs[3].id, recs[4].id]
        # Space comes back: the next append moves memory to disk and says so once.
        await lift_page_limit(buf)
        with capture_logs() as logs:
            await buf.append("press1", make_samples(11, 1))
        assert [e["event"] for e in logs] == ["buffer.disk.recovered"]
        assert logs[0]["moved_records"] == 2
        stats = buf.stats()
        assert (stats.degraded, stats.memory_records, stats.records) == (False, 0, 4)
        final = await buf.take(10)
        assert [r.id for r in final] == [recs[1].id, recs[3].id, recs[4].id, final[-1].id]
        assert final[-1].id > recs[4].id
        # Moved to the file as body + dictionary (the oven's, new to the file), they come
        # back byte for byte as they were held in memory.
        assert [r.data for r in final[:3]] == [recs[1].data, recs[3].data, recs[4].data]
    finally:
        await buf.close()
    # All of it is in the file now.
    again = SqliteBuffer(cfg)
    await again.open()
    try:
        assert [r.id for r in await again.take(10)] == [r.id for r in final]
        assert again.last_seq() == 11
    finally:
        await again.close()


async def test_memory_fallback_is_bounded_and_drops_are_gaps(tmp_path: Path) -> None:
    buf = SqliteBuffer(config(tmp_path, memory_fallback_bytes=MIB))
    await buf.open()
    try:
        await fill_page_limit(buf)
        with capture_logs() as logs:
            for i in range(30):  # 30 × ~100 KiB into a 1 MiB fallback
                await buf.append("press1", make_samples(1 + i, 1, pad=100_000))
        stats = buf.stats()
        assert stats.memory_bytes <= MIB
        assert stats.memory_records == stats.records < 30
        gaps = await buf.take_gaps()
        assert [g.reason for g in gaps] == ["memory_full"]
        assert gaps[0].first_seq == 1
        assert gaps[0].last_seq == 30 - stats.memory_records
        assert stats.dropped_samples == 30 - stats.memory_records
        assert [e["event"] for e in logs] == ["buffer.disk.failed", "buffer.full.dropping"]
        # The newest are kept, in order.
        assert seqs_of(await buf.take(100)) == list(range(gaps[0].last_seq + 1, 31))
        # Recovery writes the gaps to the file too.
        await lift_page_limit(buf)
        await buf.commit([])
        await buf.append("press1", make_samples(31, 1))
        assert not buf.stats().degraded
    finally:
        await buf.close()
    again = SqliteBuffer(config(tmp_path))
    await again.open()
    try:
        assert [g.reason for g in await again.take_gaps()] == ["memory_full"]
    finally:
        await again.close()


async def test_crash_while_degraded_does_not_reuse_seqs(tmp_path: Path) -> None:
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    await buf.append("press1", make_samples(1, 2))
    await fill_page_limit(buf)
    await buf.append("press1", make_samples(3, 40, pad=500))
    assert buf.stats().degraded
    # A crash: the connection goes away without a chance to write memory to disk.
    await buf._run(buf._close_connection)
    executor, buf._executor = buf._executor, None
    assert executor is not None
    executor.shutdown()
    again = SqliteBuffer(config(tmp_path))
    await again.open()
    try:
        # The memory records are lost, but their seqs are not handed out again: the
        # restart continues above the lease, in the same epoch, and reports the rest of
        # the lease (which holds the lost ones) as a gap.
        assert seqs_of(await again.take(10)) == [1, 2]
        lease_end = 2 + LEASE_BLOCK
        assert again.last_seq() == lease_end
        assert again.epoch == buf.epoch
        assert await again.take_gaps() == [Gap(3, lease_end, lease_end - 2, "skipped", buf.epoch)]
    finally:
        await again.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a real file system that fills up. Skipped where mounting is not
    permitted (not root, or in a container without CAP_SYS_ADMIN)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_real_full_file_system_degrades_and_recovers(small_fs: Path) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (1 * MIB))
    cfg = BufferConfig(path=str(small_fs / "buf.db"), max_bytes=64 * MIB)
    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        seq = 0
        with capture_logs() as logs:
            while not buf.stats().degraded:
                await buf.append("press1", make_samples(seq + 1, 5, pad=2000))
                seq += 5
                assert seq < 10_000, "the file system never filled up"
            for _ in range(20):  # the agent stays up and keeps appending
                await buf.append("press1", make_samples(seq + 1, 5, pad=2000))
                seq += 5
        failed = [e for e in logs if e["event"] == "buffer.disk.failed"]
        assert len(failed) == 1
        assert failed[0]["reason"] in {"SQLITE_FULL", "SQLITE_IOERR_WRITE"}
        assert buf.stats().memory_records >= 20
        filler.unlink()  # space comes back
        buf._next_probe = 0.0
        with capture_logs() as logs:
            await buf.append("press1", make_samples(seq + 1, 1))
            seq += 1
        assert [e["event"] for e in logs] == ["buffer.disk.recovered"]
        # Nothing accepted was lost: every seq is there, in order.
        assert seqs_of(await buf.take(100_000)) == list(range(1, seq + 1))
        assert await buf.take_gaps() == []
    finally:
        await buf.close()


# ---------------------------------------------------------------------- damaged files


async def write_buffer(tmp_path: Path, records: int = 60) -> dict[int, Record]:
    """A closed buffer file with `records` records of 10 samples (some inline, some with
    overflow pages); returns them by id."""
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    for i in range(records):
        await buf.append("press1", make_samples(1 + 10 * i, 10, pad=(i % 3) * 700))
    recs = {r.id: r for r in await buf.take(1000)}
    await buf.close()
    return recs


async def open_damaged(tmp_path: Path) -> tuple[SqliteBuffer, list[MutableMapping[str, Any]]]:
    buf = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await buf.open()
    return buf, logs


def covered(records: list[Record], gaps: list[Gap]) -> set[int]:
    return set(seqs_of(records)) | {q for g in gaps for q in range(g.first_seq, g.last_seq + 1)}


@pytest.mark.parametrize("damage", ["truncate", "flip_page", "zero_tail_pages"])
async def test_damaged_file_is_salvaged(tmp_path: Path, damage: str) -> None:
    original = await write_buffer(tmp_path)
    path = tmp_path / "buf.db"
    size = path.stat().st_size
    with path.open("r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        elif damage == "flip_page":
            # An impossible page type / overflow pointer in pages past the schema.
            f.seek(size // 2 // 4096 * 4096)
            f.write(b"\xff" * 8192)
        else:
            f.seek(size - 3 * 4096)
            f.write(b"\0" * 3 * 4096)
    buf, logs = await open_damaged(tmp_path)
    try:
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("buffer.corrupt.moved_aside", "error")
        ]
        event = logs[0]
        aside = [n for n in names(tmp_path) if n.startswith("buf.db.corrupt-")]
        assert len(aside) == 1
        recs = await buf.take(1000)
        gaps = await buf.take_gaps()
        # What was recovered is exactly what was written, with its id.
        assert recs, "nothing salvaged"
        for r in recs:
            assert r == original[r.id]
        assert len(recs) < len(original)
        assert event["recovered_records"] == len(recs)
        assert event["recovered_samples"] == sum(r.count for r in recs)
        # Every seq is either delivered later or reported as lost.
        assert covered(recs, gaps) >= set(range(1, 601))
        assert {g.reason for g in gaps} == {"corrupt"}
        assert event["lost_seq_ranges"] == [
            f"{g.first_seq}-{g.last_seq}" if g.first_seq != g.last_seq else str(g.first_seq)
            for g in gaps
        ]
        assert buf.last_seq() == 600
        await buf.append("press1", make_samples(601, 1))
    finally:
        await buf.close()


async def test_garbage_file_is_moved_aside_and_reported_unknown(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    path.write_bytes(os.urandom(64 * 1024))
    buf, logs = await open_damaged(tmp_path)
    try:
        assert [e["event"] for e in logs] == ["buffer.corrupt.moved_aside"]
        assert logs[0]["recovered_records"] == 0
        assert logs[0]["lost_seq_ranges"] == "unknown"
        assert await buf.take(10) == []
        await buf.append("press1", make_samples(1, 1))
    finally:
        await buf.close()
