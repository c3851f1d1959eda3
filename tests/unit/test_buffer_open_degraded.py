"""A buffer whose disk is full (or read-only, or failing) already at open(): it starts
degraded instead of failing, keeps the seq high-water mark, and recovers by itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.buffer import Record
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import make_samples


def config(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig.model_validate({"path": str(tmp_path / "buf.db"), **kw})


def disk_full_error() -> sqlite3.OperationalError:
    """A genuine SQLITE_FULL error object (with sqlite_errorname set by SQLite)."""
    con = sqlite3.connect(":memory:")
    try:
        con.execute("PRAGMA max_page_count=1")
        con.execute("CREATE TABLE t (x)")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        con.close()
    raise AssertionError("SQLite did not report a full database")


class FailingConnect:
    """Makes SqliteBuffer._connect fail with SQLITE_FULL while `failing` is true."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = True
        self.calls = 0
        real = SqliteBuffer._connect

        def connect(buf: SqliteBuffer, path: Path | None = None) -> sqlite3.Connection:
            self.calls += 1
            if self.failing:
                raise disk_full_error()
            return real(buf, path)

        monkeypatch.setattr(SqliteBuffer, "_connect", connect)


def write_seq_file(cfg: BufferConfig, text: bytes) -> None:
    """`<path>.seq` as the buffer writes it (or damaged, for a non-number)."""
    Path(f"{cfg.path}.seq").write_bytes(text.ljust(31) + b"\n")


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def exists(path: str) -> bool:
    return Path(path).exists()


def spans(records: list[Record]) -> list[tuple[int, int, int]]:
    return [(r.id, r.first_seq, r.last_seq) for r in records]


async def make_file(cfg: BufferConfig) -> None:
    """A healthy file holding seqs 1-5 and 6-7 (ids 1 and 2), then closed."""
    buf = SqliteBuffer(cfg)
    await buf.open()
    await buf.append("press1", make_samples(1, 5))
    await buf.append("press1", make_samples(6, 2))
    await buf.close()


async def test_full_disk_at_start_runs_degraded_and_recovers_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path)
    await make_file(cfg)
    # A previous run that was degraded wrote a higher mark only into the side file.
    write_seq_file(cfg, b"12")
    fail = FailingConnect(monkeypatch)
    buf = SqliteBuffer(cfg)
    with capture_logs() as logs:
        await buf.open()
    try:
        failed = [e for e in logs if e["event"] == "buffer.disk.failed"]
        assert len(failed) == 1
        assert failed[0]["log_level"] == "error"
        assert failed[0]["reason"] == "SQLITE_FULL"
        assert failed[0]["at_start"] is True
        assert "memory" in failed[0]["detail"]
        stats = buf.stats()
        assert stats.degraded
        assert stats.health == "degraded"
        assert stats.degraded_reason == "SQLITE_FULL"
        assert stats.records == 2
        assert stats.samples == 7
        assert buf.last_seq() == 12  # max of the file (7) and the side file (12)
        with pytest.raises(ValueError, match="not above"):
            await buf.append("press1", make_samples(12, 1))
        with capture_logs() as logs:
            await buf.append("press1", make_samples(13, 3))
            await buf.append("press2", make_samples(16, 1, device="press2"))
        assert not [e for e in logs if e["event"] == "buffer.disk.failed"]  # logged once
        assert buf.stats().memory_records == 2
        # The records on disk come first (read through the read-only look), then memory.
        taken = await buf.take(10)
        assert spans(taken) == [(1, 1, 5), (2, 6, 7), (3, 13, 15), (4, 16, 16)]
        await buf.commit([1, 3])  # one on disk (deleted on recovery), one in memory
        assert spans(await buf.take(10)) == [(2, 6, 7), (4, 16, 16)]
        assert buf.stats().samples == 3
        # Still failing: the probe keeps it degraded and keeps the memory records.
        buf._next_probe = 0.0
        await buf.append("press1", make_samples(17, 2))
        assert buf.stats().degraded
        # The disk works again: the next probe opens the file and moves memory there.
        fail.failing = False
        buf._next_probe = 0.0
        with capture_logs() as logs:
            await buf.append("press1", make_samples(19, 1))
        recovered = [e for e in logs if e["event"] == "buffer.disk.recovered"]
        assert len(recovered) == 1
        assert recovered[0]["since_start"] is True
        assert recovered[0]["moved_records"] == 2
        stats = buf.stats()
        assert not stats.degraded
        assert stats.health != "degraded"
        assert stats.memory_records == 0
        assert spans(await buf.take(10)) == [(2, 6, 7), (4, 16, 16), (5, 17, 18), (6, 19, 19)]
    finally:
        await buf.close()
    # All of it is on disk now: a fresh open sees the same records and mark.
    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        assert spans(await buf.take(10)) == [(2, 6, 7), (4, 16, 16), (5, 17, 18), (6, 19, 19)]
        assert buf.last_seq() == 19
        assert not buf.stats().degraded
    finally:
        await buf.close()
    assert not exists(f"{cfg.path}-shm")  # the read-only look left nothing behind


async def test_no_file_at_all_starts_at_zero_or_at_the_side_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path)
    fail = FailingConnect(monkeypatch)
    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        assert buf.stats().degraded
        assert buf.last_seq() == 0
        await buf.append("press1", make_samples(1, 2))
        assert spans(await buf.take(5)) == [(1, 1, 2)]
    finally:
        await buf.close()  # the disk still fails: the memory records are lost
    write_seq_file(cfg, b"40")
    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        assert buf.stats().degraded
        assert buf.last_seq() == 40
        await buf.append("press1", make_samples(41, 2))
        fail.failing = False
        buf._next_probe = 0.0
        await buf.append("press1", make_samples(43, 1))
        assert not buf.stats().degraded
        assert spans(await buf.take(5)) == [(1, 41, 42), (2, 43, 43)]
        assert buf.last_seq() == 43
    finally:
        await buf.close()


async def test_close_while_still_failing_reports_the_loss_and_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path)
    await make_file(cfg)
    before = read(cfg.path)
    FailingConnect(monkeypatch)
    buf = SqliteBuffer(cfg)
    await buf.open()
    await buf.append("press1", make_samples(8, 1))
    with capture_logs() as logs:
        await buf.close()
    lost = [e for e in logs if e["event"] == "buffer.disk.lost_on_close"]
    assert len(lost) == 1
    assert lost[0]["records"] == 1
    assert not [e for e in logs if e["event"] == "buffer.close.checkpoint_failed"]
    assert read(cfg.path) == before


async def test_unreadable_file_on_a_failing_disk_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path)
    await make_file(cfg)
    FailingConnect(monkeypatch)
    real = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(database).startswith("file:"):
            raise sqlite3.OperationalError("disk I/O error")
        con: sqlite3.Connection = real(database, *args, **kwargs)
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)
    buf = SqliteBuffer(cfg)
    with pytest.raises(RuntimeError, match="high-water mark is unknown"):
        await buf.open()


async def test_damaged_side_file_without_database_starts_a_new_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease is unknown: a new epoch keeps every identity unique without it.
    cfg = config(tmp_path)
    write_seq_file(cfg, b"\xff garbage")
    FailingConnect(monkeypatch)
    buf = SqliteBuffer(cfg)
    with capture_logs() as logs:
        await buf.open()
    try:
        assert [e["event"] for e in logs] == ["buffer.seqfile.damaged", "buffer.disk.failed"]
        assert buf.stats().degraded
        assert len(buf.epoch) == 32
        assert buf.last_seq() == 0
        await buf.append("press1", make_samples(1, 2))
        assert [r.epoch for r in await buf.take(5)] == [buf.epoch]
    finally:
        await buf.close()


async def test_other_open_errors_still_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only disk errors start degraded: a locked file keeps its clear error."""
    cfg = config(tmp_path)
    holder = SqliteBuffer(cfg)
    await holder.open()
    try:
        buf = SqliteBuffer(cfg)
        with pytest.raises(RuntimeError, match="in use"):
            await buf.open()
    finally:
        await holder.close()
