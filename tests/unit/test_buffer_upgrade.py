"""A buffer written by the format-2 release (tests/fixtures/buffer_v2, made by its
make.py with that release's code) is read after the upgrade: every record is delivered
exactly, and new records in format 3 follow them in the same file."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from agent.buffer import Gap
from agent.buffer.common import record_json, record_samples
from agent.buffer.record import is_body
from agent.buffer.sqlite import FORMAT_VERSION, PAGE_SIZE, SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import make_samples

FIXTURE = Path(__file__).parent.parent / "fixtures" / "buffer_v2"


def expected() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURE / "expected.json").read_bytes())
    return data


@pytest.fixture
def v2_file(tmp_path: Path) -> Path:
    for name in ("buffer.db", "buffer.db.seq"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    return tmp_path / "buffer.db"


def user_version(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("PRAGMA user_version").fetchone()[0])
    finally:
        con.close()


def test_the_fixture_is_a_format_2_file_with_records_of_every_kind() -> None:
    assert FORMAT_VERSION == 3
    assert user_version(FIXTURE / "buffer.db") == 2
    exp = expected()
    samples = [s for r in exp["records"] for s in r["samples"]]
    assert len(exp["records"]) >= 4
    assert exp["gaps"]
    assert any(s["ts_source"] for s in samples)
    assert any("value_text" in s for s in samples)
    assert any(s["quality"] != "good" for s in samples)


async def test_format_2_records_are_delivered_exactly_after_the_upgrade(v2_file: Path) -> None:
    exp = expected()
    buf = SqliteBuffer(BufferConfig(path=str(v2_file)))
    await buf.open()
    try:
        # The .seq lease confirms the file: same epoch, no new one.
        assert buf.epoch == exp["epoch"]
        assert buf.last_seq() == exp["last_seq"]
        assert await buf.take_gaps() == [Gap(*g) for g in exp["gaps"]]
        records = await buf.take(100)
        assert len(records) == len(exp["records"])
        for rec, want in zip(records, exp["records"], strict=True):
            assert (rec.id, rec.device, rec.first_seq, rec.last_seq, rec.count) == (
                want["id"],
                want["device"],
                want["first_seq"],
                want["last_seq"],
                want["count"],
            )
            assert (rec.created, rec.epoch) == (want["created"], want["epoch"])
            # Kept as they were (JSON), read through the one decode entry point.
            assert not is_body(rec.data)
            assert record_samples(rec.data) == want["samples"]
            assert orjson.loads(record_json(rec.data)) == want["samples"]
        # New records are format 3, after the old ones, in the same file.
        last = exp["last_seq"]
        await buf.append("press1", make_samples(last + 1, 3))
        newer = await buf.take(10, after_id=records[-1].id)
        assert [(r.first_seq, r.count) for r in newer] == [(last + 1, 3)]
        assert record_samples(newer[0].data)[0]["seq"] == last + 1
        await buf.commit([r.id for r in records])
        st = buf.stats()
        assert (st.records, st.samples) == (1, 3)
    finally:
        await buf.close()
    assert user_version(v2_file) == FORMAT_VERSION
    again = SqliteBuffer(BufferConfig(path=str(v2_file)))
    await again.open()
    try:
        assert [r.first_seq for r in await again.take(10)] == [exp["last_seq"] + 1]
        assert again.epoch == exp["epoch"]
    finally:
        await again.close()


async def test_a_newer_format_is_refused(v2_file: Path) -> None:
    con = sqlite3.connect(v2_file)
    con.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    con.close()
    buf = SqliteBuffer(BufferConfig(path=str(v2_file)))
    with pytest.raises(RuntimeError, match=f"buffer format {FORMAT_VERSION + 1} is newer"):
        await buf.open()
    assert user_version(v2_file) == FORMAT_VERSION + 1  # left as it was


def page_size(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("PRAGMA page_size").fetchone()[0])
    finally:
        con.close()


async def test_an_upgraded_file_gets_the_new_page_size_when_it_drains(v2_file: Path) -> None:
    exp = expected()
    assert page_size(v2_file) == 4096
    buf = SqliteBuffer(BufferConfig(path=str(v2_file)))
    await buf.open()
    try:
        records = await buf.take(100)
        with capture_logs() as logs:
            await buf.commit([r.id for r in records])
        assert [e["event"] for e in logs] == ["buffer.page_size.changed"]
        assert (logs[0]["old_page_size"], logs[0]["page_size"]) == (4096, PAGE_SIZE)
        assert logs[0]["journal_mode"] == "wal"
        last = exp["last_seq"]
        await buf.append("press1", make_samples(last + 1, 2))
    finally:
        await buf.close()
    assert page_size(v2_file) == PAGE_SIZE
    again = SqliteBuffer(BufferConfig(path=str(v2_file)))
    await again.open()
    try:
        assert again.epoch == exp["epoch"]
        assert await again.take_gaps() == [Gap(*g) for g in exp["gaps"]]
        (rec,) = await again.take(10)
        assert (rec.first_seq, rec.count) == (exp["last_seq"] + 1, 2)
        assert rec.id > records[-1].id  # ids are never reused, across the rebuild too
    finally:
        await again.close()
