"""Bytes of a record flipped in the buffer file (SQLite's own checks cannot see inside a
blob): the record's checksum catches it at take; the record is set aside and reported as
a gap with reason corrupt, never published wrong; the others are delivered."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.buffer import Gap, Record
from agent.buffer.common import record_samples
from agent.buffer.record import split_record
from agent.buffer.salvage import DEFAULT_COLS, copy_dicts, intact
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import make_samples


def config(tmp_path: Path) -> BufferConfig:
    return BufferConfig(path=str(tmp_path / "buf.db"))


def steady(first: int, n: int = 20) -> list[dict[str, object]]:
    """One poll of a device with the same tags every time (one dictionary)."""
    out = []
    for i, s in enumerate(make_samples(first, n)):
        s["tag"] = f"tag{i}"
        s["value"] = first * 1000 + i
        out.append(dict(s))
    return out


async def write(tmp_path: Path, records: int = 6) -> list[Record]:
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    for k in range(records):
        await buf.append("press1", steady(1 + 20 * k))  # type: ignore[arg-type]
    recs = await buf.take(100)
    await buf.close()
    return recs


def flip(path: Path, needle: bytes, at: int) -> int:
    """Flip one byte `at` bytes into every copy of `needle` in the file; returns how many
    copies there were."""
    content = bytearray(path.read_bytes())
    found = 0
    start = content.find(needle)
    while start >= 0:
        content[start + at] ^= 0x55
        found += 1
        start = content.find(needle, start + 1)
    assert found, "needle not in the file"
    path.write_bytes(bytes(content))
    return found


async def test_a_flipped_byte_in_a_record_is_a_corrupt_gap(tmp_path: Path) -> None:
    recs = await write(tmp_path)
    victim = recs[2]
    body = split_record(victim.data)[1]
    flip(tmp_path / "buf.db", body[36:], len(body[36:]) // 2)
    buf = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await buf.open()
    try:
        with capture_logs() as logs:
            got = await buf.take(100)
        assert got == [r for r in recs if r.id != victim.id]
        for r in got:
            assert record_samples(r.data) == record_samples(recs[r.id - 1].data)
        assert await buf.take_gaps() == [
            Gap(victim.first_seq, victim.last_seq, victim.count, "corrupt", buf.epoch)
        ]
        st = buf.stats()
        assert st.records == len(recs) - 1
        assert st.dropped_by_reason == {"corrupt": victim.count}
        events = [(e["event"], e["log_level"], e["record_id"]) for e in logs]
        assert events == [("buffer.record.corrupt", "error", victim.id)]
        assert "checksum" in logs[0]["error"]
        # Set aside for inspection, not delivered: the next take does not see it again.
        assert await buf.take(100) == got
    finally:
        await buf.close()
    con = sqlite3.connect(tmp_path / "buf.db")
    kept = con.execute("SELECT record_id, first_seq, error FROM set_aside").fetchall()
    con.close()
    assert [(k[0], k[1]) for k in kept] == [(victim.id, victim.first_seq)]


async def test_a_flipped_byte_in_a_dictionary_sets_its_records_aside(tmp_path: Path) -> None:
    recs = await write(tmp_path, records=3)
    dictionary = split_record(recs[0].data)[0]
    # Every copy: the table's and the one in its UNIQUE index.
    flip(tmp_path / "buf.db", dictionary, len(dictionary) // 2)
    buf = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await buf.open()
        got = await buf.take(100)
    try:
        assert got == []
        assert await buf.take_gaps() == [Gap(1, 60, 60, "corrupt", buf.epoch)]
        names = [e["event"] for e in logs]
        assert names == ["buffer.dictionary.corrupt"] + ["buffer.record.corrupt"] * 3
        # New records get a new, intact dictionary and are delivered.
        await buf.append("press1", steady(61))  # type: ignore[arg-type]
        (new,) = await buf.take(100)
        assert record_samples(new.data)[0]["value"] == 61000
    finally:
        await buf.close()


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
async def test_salvage_keeps_only_rows_that_pass_their_checksum(tmp_path: Path, where: str) -> None:
    recs = await write(tmp_path, records=3)
    body = split_record(recs[1].data)[1]
    at = {"header": 10, "payload": 40, "checksum": len(body) - 2}[where]
    flip(tmp_path / "buf.db", body, at)
    old = sqlite3.connect(tmp_path / "buf.db")
    new = sqlite3.connect(":memory:")
    new.execute("CREATE TABLE dicts (id INTEGER PRIMARY KEY, data BLOB NOT NULL UNIQUE)")
    try:
        dicts = copy_dicts(old, new)
        rows = old.execute(f"SELECT {DEFAULT_COLS} FROM records ORDER BY id").fetchall()
    finally:
        old.close()
        new.close()
    assert [intact(row, dicts) for row in rows] == [True, False, True]
    assert not intact(rows[0], {})  # its dictionary is missing
