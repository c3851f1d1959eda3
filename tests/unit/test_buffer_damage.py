"""The buffer file damaged while the buffer is open (a bad sector, bytes overwritten under
it): the real SqliteBuffer notices at the next read or write, salvages what is readable
into a new file, moves the damaged one aside, reports the loss as a gap, and goes on."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.buffer import Gap, Record
from agent.buffer.sqlite import PROBE_INTERVAL_S, SqliteBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.payload import PayloadEncoder
from agent.publish.fake import FakePublisher
from tests.support.payloads import decoded
from tests.support.samples import make_samples, names

RECORDS = 300
PER_RECORD = 10


def config(tmp_path: Path) -> BufferConfig:
    return BufferConfig(path=str(tmp_path / "buf.db"))


def seqs_of(records: list[Record]) -> list[int]:
    return [q for r in records for q in range(r.first_seq, r.last_seq + 1)]


def covered(records: list[Record], gaps: list[Gap]) -> set[int]:
    return set(seqs_of(records)) | {q for g in gaps for q in range(g.first_seq, g.last_seq + 1)}


async def filled(tmp_path: Path) -> tuple[SqliteBuffer, dict[int, Record]]:
    """An open buffer with RECORDS records (some inline, some with overflow pages), the
    older half checkpointed into the database file and the newer half in the WAL, and a
    page cache so small that reads go to the disk (as they do for a large backlog)."""
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    await buf._run(lambda: buf._require_con().execute("PRAGMA cache_size=16"))
    for i in range(RECORDS):
        if i == RECORDS // 2:
            await buf._run(
                lambda: buf._require_con().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            )
        first = 1 + PER_RECORD * i
        await buf.append("press1", make_samples(first, PER_RECORD, pad=(i % 3) * 700))
    original = {r.id: r for r in await buf.take(10_000)}
    assert len(original) == RECORDS
    return buf, original


def scribble(path: Path, at: float, length: int = 16 * 4096) -> None:
    """Overwrite `length` bytes of the file at fraction `at` of its size with garbage."""
    size = path.stat().st_size
    assert size > length, (path, size)
    with path.open("r+b") as f:
        f.seek(int(size * at) // 4096 * 4096)
        f.write(os.urandom(length))


def moved(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "buffer.corrupt.moved_aside"]


@pytest.mark.parametrize("first_call", ["take", "commit"])
async def test_file_damaged_while_open_is_salvaged_and_delivery_goes_on(
    tmp_path: Path, first_call: str
) -> None:
    buf, original = await filled(tmp_path)
    epoch = buf.epoch
    try:
        scribble(tmp_path / "buf.db", 0.4)
        scribble(tmp_path / "buf.db-wal", 0.5)
        with capture_logs() as logs:
            if first_call == "take":
                recs = await buf.take(10_000)
            else:
                # Deleting every record walks the whole table and meets the damage.
                await buf.commit(list(original))
                recs = await buf.take(10_000)
        events = moved(logs)
        assert len(events) == 1, logs
        event = events[0]
        assert event["log_level"] == "error"
        assert event["at_start"] is False
        assert [n for n in names(tmp_path) if n.startswith("buf.db.damaged-")] != []
        st = buf.stats()
        assert st.damaged_files == 1
        assert not st.degraded
        assert st.last_salvage is not None
        assert st.last_salvage.at_start is False
        gaps = await buf.take_gaps()
        assert {g.reason for g in gaps} <= {"corrupt"}
        assert all(g.epoch == epoch for g in gaps)
        if first_call == "take":
            # What was recovered is exactly what was written, with its id.
            assert recs, "nothing salvaged"
            for r in recs:
                assert r == original[r.id]
            # Every seq is delivered later or reported as lost; losses are counted.
            assert covered(recs, gaps) >= set(range(1, RECORDS * PER_RECORD + 1))
            lost = RECORDS * PER_RECORD - sum(r.count for r in recs)
            assert lost > 0, "the damage was not noticed"
            assert st.dropped_by_reason.get("corrupt") == lost == event["lost_samples"]
            assert st.last_salvage.lost_samples == lost
            assert st.samples == sum(r.count for r in recs)
            assert event["recovered_records"] == len(recs)
        else:
            # The delivered records are deleted from the salvaged file too.
            assert recs == []
            assert st.records == 0
            assert st.samples == 0
        # Delivery goes on: the same epoch, seqs continue, the new file is healthy.
        assert buf.epoch == epoch
        await buf.append("press1", make_samples(RECORDS * PER_RECORD + 1, 5))
        newest = (await buf.take(10_000))[-1]
        assert newest.first_seq == RECORDS * PER_RECORD + 1
        assert newest.epoch == epoch
        await buf.commit([r.id for r in await buf.take(10_000)])
        assert buf.stats().records == 0
    finally:
        await buf.close()
    again = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await again.open()
    try:
        assert [e["event"] for e in logs] == []  # healthy; the epoch and lease were kept
        assert again.epoch == epoch
        assert again.last_seq() == RECORDS * PER_RECORD + 5
    finally:
        await again.close()


async def test_salvage_that_cannot_write_degrades_to_memory_and_is_retried(
    tmp_path: Path,
) -> None:
    buf, original = await filled(tmp_path)
    # The new file cannot be made (here: its name is taken by a directory).
    blocker = tmp_path / "buf.db.salvage"
    blocker.mkdir()
    try:
        scribble(tmp_path / "buf.db", 0.3)
        scribble(tmp_path / "buf.db-wal", 0.3)
        with capture_logs() as logs:
            await buf.take(10_000)
            await buf.append("press1", make_samples(RECORDS * PER_RECORD + 1, 3))
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "buffer.corrupt.salvage_failed"
        ]
        st = buf.stats()
        assert st.degraded
        assert st.degraded_reason == "corrupt"
        assert st.memory_fallback
        assert st.memory_records == 1
        # Never raises, and what memory holds is delivered meanwhile.
        recs = await buf.take(10_000)
        assert recs[-1].first_seq == RECORDS * PER_RECORD + 1
        # Once the salvage can be done, it is done at the next probe, and the records
        # held in memory move into the new file.
        blocker.rmdir()
        buf._next_probe = 0.0
        with capture_logs() as logs:
            await buf.append("press1", make_samples(RECORDS * PER_RECORD + 4, 1))
        assert [e["event"] for e in logs] == ["buffer.corrupt.moved_aside", "buffer.disk.recovered"]
        st = buf.stats()
        assert not st.degraded
        assert st.memory_records == 0
        assert st.damaged_files == 1
        recs = await buf.take(10_000)
        gaps = await buf.take_gaps()
        assert covered(recs, gaps) >= set(range(1, RECORDS * PER_RECORD + 5))
        assert [r.first_seq for r in recs][-2:] == [
            RECORDS * PER_RECORD + 1,
            RECORDS * PER_RECORD + 4,
        ]
        assert all(r == original[r.id] for r in recs[:-2])
    finally:
        await buf.close()


class _FailingReads:
    """A connection whose reads of the records table fail with a disk I/O error (a bad
    sector under the table), as SQLite reports it; everything else passes through."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con
        self.failing = True

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failing and "FROM records WHERE id > ?" in sql:
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorname = "SQLITE_IOERR_READ"
            raise exc
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


async def test_reads_that_keep_failing_are_treated_as_damage(tmp_path: Path) -> None:
    buf, original = await filled(tmp_path)
    real = buf._require_con()
    failing = _FailingReads(real)
    buf._con = failing  # type: ignore[assignment]
    try:
        with capture_logs() as logs:
            # A failing read alone is a disk error: degrade, serve memory, no salvage.
            assert await buf.take(10) == []
        assert [e["event"] for e in logs] == ["buffer.disk.failed"]
        assert buf.stats().degraded
        # The disk writes again (the probe recovers), but the reads still fail after a
        # whole probe interval: that is damage, and the salvage reads around it.
        assert buf._read_failed_at is not None
        buf._read_failed_at -= PROBE_INTERVAL_S
        buf._next_probe = 0.0
        with capture_logs() as logs:
            await buf.append("press1", make_samples(RECORDS * PER_RECORD + 1, 1))
            recs = await buf.take(10_000)
        assert [e["event"] for e in logs] == ["buffer.disk.recovered", "buffer.corrupt.moved_aside"]
        # The salvage read every record (only the take query failed): nothing lost.
        assert [r.id for r in recs[:-1]] == sorted(original)
        assert buf.stats().dropped_by_reason.get("corrupt", 0) == 0
        assert await buf.take_gaps() == []
    finally:
        await buf.close()


async def test_forwarder_delivers_through_the_damage_and_announces_the_loss(
    tmp_path: Path,
) -> None:
    """The forwarder over the real buffer: after the damage it is not stopped, it
    delivers every intact record and the new ones, and the next message carries the
    corrupt gaps."""
    buf, _ = await filled(tmp_path)
    pub = FakePublisher()
    await pub.start()
    fwd = Forwarder(buf, pub, PayloadEncoder(AgentSection(id="gw"), MqttConfig()), max_records=50)
    try:
        scribble(tmp_path / "buf.db", 0.4)
        scribble(tmp_path / "buf.db-wal", 0.5)
        await buf.append("press1", make_samples(RECORDS * PER_RECORD + 1, 5))
        while await fwd.forward_once():
            pass
        assert buf.stats().records == 0
        assert buf.stats().damaged_files == 1
        delivered: set[int] = set()
        announced: set[int] = set()
        reasons: set[str] = set()
        for d in decoded(pub.published):
            delivered |= {int(s["seq"]) for s in d.samples}
            for g in d.gaps:
                announced |= set(range(g["first_seq"], g["last_seq"] + 1))
                reasons.add(g["reason"])
        assert reasons == {"corrupt"}
        assert delivered | announced >= set(range(1, RECORDS * PER_RECORD + 6))
        assert RECORDS * PER_RECORD + 5 in delivered
        assert await buf.take_gaps() == []  # cleared once announced
    finally:
        await pub.close()
        await buf.close()
