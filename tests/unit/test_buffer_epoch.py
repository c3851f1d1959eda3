"""Buffer epochs and durable seq leases: (agent, epoch, seq) is never reused, across
clean and unclean restarts, power cuts (simulated by rolled-back files), lost or replaced
files and reinstalls."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import agent.buffer.sqlite as sqlite_mod
from agent.buffer import Gap, Record
from agent.buffer.memory import MemoryBuffer
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import make_samples


def config(directory: Path, **kw: object) -> BufferConfig:
    return BufferConfig.model_validate({"path": str(directory / "buf.db"), **kw})


def seq_file(directory: Path) -> tuple[int, str]:
    lease, epoch = (directory / "buf.db.seq").read_text().split()
    return int(lease), epoch


def seqs_of(records: list[Record]) -> list[int]:
    return [q for r in records for q in range(r.first_seq, r.last_seq + 1)]


async def crash(buf: SqliteBuffer) -> None:
    """Stop without close(): no checkpoint, the lease is not given back."""
    await buf._run(buf._close_connection)
    executor, buf._executor = buf._executor, None
    assert executor is not None
    executor.shutdown()


async def test_new_buffer_has_an_epoch_that_a_clean_restart_keeps(tmp_path: Path) -> None:
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    epoch = buf.epoch
    assert len(epoch) == 32
    assert int(epoch, 16) >= 0
    await buf.append("press1", make_samples(1, 5))
    assert [r.epoch for r in await buf.take(10)] == [epoch]
    assert buf.stats().epoch == epoch
    await buf.close()
    # A clean close gives the unused lease back: no skipped seqs after a clean restart.
    assert seq_file(tmp_path) == (5, epoch)
    again = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await again.open()
    try:
        assert logs == []
        assert (again.epoch, again.last_seq()) == (epoch, 5)
        assert await again.take_gaps() == []
    finally:
        await again.close()


async def test_leases_are_flushed_before_use_one_flush_per_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_mod, "LEASE_BLOCK", 100)
    flushes: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        flushes.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    try:
        flushes.clear()
        seq = 1
        for n in [7] * 100:  # 700 seqs
            await buf.append("press1", make_samples(seq, n))
            seq += n
            # Whatever is stored is covered by the lease on disk.
            lease, _ = seq_file(tmp_path)
            assert lease >= seq - 1
            assert buf.stats().leased_seq == lease
        # Each lease covers one batch plus 100: 700 / 107 -> 7 flushes.
        assert len(flushes) == 7
        assert buf.stats().lease_ok
    finally:
        await buf.close()


async def test_power_cut_rolls_back_the_file_but_no_seq_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With durability process_crash, a power cut can take the database back to an
    earlier state (commits not yet synced are gone), appends and deletes alike. The
    lease in <path>.seq is flushed before use, so it survives: simulated here by the
    database and WAL as they were at T0 with the lease file as it was at the cut (T1)."""
    monkeypatch.setattr(sqlite_mod, "LEASE_BLOCK", 50)
    live, cut = tmp_path / "live", tmp_path / "cut"
    live.mkdir()
    cut.mkdir()
    buf = SqliteBuffer(config(live))
    await buf.open()
    epoch = buf.epoch
    seq = 1
    for _ in range(20):
        await buf.append("press1", make_samples(seq, 4))
        seq += 4
    # T0: what the disk holds after the power cut (the WAL as far as it was synced).
    for name in ("buf.db", "buf.db-wal"):
        shutil.copy(live / name, cut / name)
    rolled_back_high = seq - 1
    # After T0: more samples, delivered (they left the agent) and deleted.
    delivered: list[Record] = []
    for _ in range(30):
        await buf.append("press1", make_samples(seq, 4))
        seq += 4
        recs = await buf.take(100)
        delivered += recs
        await buf.commit([r.id for r in recs])
    left_high = seq - 1
    assert left_high > rolled_back_high + 2 * sqlite_mod.LEASE_BLOCK  # leases were renewed
    shutil.copy(live / "buf.db.seq", cut / "buf.db.seq")  # flushed: survives the cut
    await crash(buf)

    again = SqliteBuffer(config(cut))
    await again.open()
    try:
        # The rollback brought back rows and seq state of T0, yet nothing that left the
        # agent is handed out again in this epoch.
        assert again.epoch == epoch
        assert again.last_seq() >= left_high
        back = await again.take(1000)
        assert max(seqs_of(back)) == rolled_back_high
        assert all(r.epoch == epoch for r in back)  # sent again: the same identity
        gaps = await again.take_gaps()
        assert gaps == [
            Gap(rolled_back_high + 1, again.last_seq(), again.last_seq() - rolled_back_high,
                "skipped", epoch)
        ]  # fmt: skip
        await again.append("press1", make_samples(again.last_seq() + 1, 3))
        used = {(epoch, q) for q in seqs_of(delivered)}
        new = {(r.epoch, q) for r in await again.take(1000) for q in seqs_of([r])}
        assert used & {(e, q) for e, q in new if q > rolled_back_high} == set()
    finally:
        await again.close()


@pytest.mark.parametrize("loss", ["seq_file_lost", "db_replaced", "reinstall"])
async def test_lost_or_replaced_state_starts_a_new_epoch(tmp_path: Path, loss: str) -> None:
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    old_epoch = buf.epoch
    await buf.append("press1", make_samples(1, 10))
    await crash(buf)
    if loss == "seq_file_lost":
        (tmp_path / "buf.db.seq").unlink()
    elif loss == "db_replaced":
        other = tmp_path / "other"
        other.mkdir()
        o = SqliteBuffer(config(other))
        await o.open()
        await o.append("press1", make_samples(1, 3))
        await o.close()
        for name in ("buf.db", "buf.db-wal"):
            (tmp_path / name).unlink(missing_ok=True)
        shutil.copy(other / "buf.db", tmp_path / "buf.db")
    else:
        for name in ("buf.db", "buf.db-wal", "buf.db.seq"):
            (tmp_path / name).unlink(missing_ok=True)
    again = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await again.open()
    try:
        assert again.epoch != old_epoch
        assert len(again.epoch) == 32
        assert seq_file(tmp_path)[1] == again.epoch
        events = [e for e in logs if e["event"] == "buffer.epoch.new"]
        if loss == "reinstall":
            assert events == []  # a new buffer: nothing to warn about
            assert again.last_seq() == 0
        else:
            assert [e["log_level"] for e in events] == ["warning"]
            # Seqs continue above what is known, which is only a courtesy: the epoch
            # alone keeps the identities apart.
            assert again.last_seq() >= 3
        # Records written before keep the epoch they were made in.
        for r in await again.take(100):
            assert r.epoch != again.epoch
        await again.append("press1", make_samples(again.last_seq() + 1, 1))
        assert (await again.take(100))[-1].epoch == again.epoch
    finally:
        await again.close()


async def test_format_1_file_is_upgraded_and_its_records_get_a_stable_epoch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buf.db"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
            first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,
            created REAL NOT NULL, data BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE gaps (id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL, count INTEGER NOT NULL, reason TEXT NOT NULL,
            created REAL NOT NULL);
        INSERT INTO meta VALUES ('last_seq', 40);
        INSERT INTO gaps (first_seq, last_seq, count, reason, created)
            VALUES (1, 2, 2, 'drop_oldest', 0);
        PRAGMA user_version = 1;
        """
    )
    import orjson

    data = orjson.dumps(make_samples(3, 2), option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z)
    con.execute(
        "INSERT INTO records (device, first_seq, last_seq, count, created, data) "
        "VALUES ('press1', 3, 4, 2, 1.0, ?)",
        (data,),
    )
    con.commit()
    con.close()
    (tmp_path / "buf.db.seq").write_bytes(b"42".ljust(31) + b"\n")  # the format-1 side file
    buf = SqliteBuffer(config(tmp_path))
    with capture_logs() as logs:
        await buf.open()
    try:
        assert [e["event"] for e in logs] == ["buffer.epoch.new"]
        assert buf.last_seq() == 42
        [rec] = await buf.take(10)
        assert (rec.first_seq, rec.epoch) == (3, buf.epoch)
        assert await buf.take_gaps() == [Gap(1, 2, 2, "drop_oldest", buf.epoch)]
        epoch = buf.epoch
    finally:
        await buf.close()
    again = SqliteBuffer(config(tmp_path))
    await again.open()
    try:
        assert again.epoch == epoch
        assert [r.epoch for r in await again.take(10)] == [epoch]
    finally:
        await again.close()


async def test_a_lease_that_cannot_be_written_is_reported_and_storing_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_mod, "LEASE_BLOCK", 10)
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    try:
        monkeypatch.setattr(os, "fdatasync", failing)
        with capture_logs() as logs:
            for first in (1, 21, 41):
                await buf.append("press1", make_samples(first, 20))
        assert [(e["event"], e["log_level"]) for e in logs] == [("buffer.lease.failed", "error")]
        st = buf.stats()
        assert not st.lease_ok
        assert st.records == 3
        monkeypatch.setattr(os, "fdatasync", real)
        with capture_logs() as logs:
            await buf.append("press1", make_samples(61, 1))
        assert [e["event"] for e in logs] == ["buffer.lease.recovered"]
        assert buf.stats().lease_ok
        assert seq_file(tmp_path)[0] >= 61
    finally:
        await buf.close()


async def test_memory_buffer_makes_an_epoch_per_open(tmp_path: Path) -> None:
    a, b = (
        MemoryBuffer(config(tmp_path, kind="memory")),
        MemoryBuffer(config(tmp_path, kind="memory")),
    )
    await a.open()
    await b.open()
    assert a.epoch != b.epoch
    assert len(a.epoch) == 32
    await a.append("press1", make_samples(1, 2))
    assert [r.epoch for r in await a.take(10)] == [a.epoch]
    assert a.stats().epoch == a.epoch


async def test_salvage_at_start_keeps_the_epoch_the_lease_confirms(tmp_path: Path) -> None:
    buf = SqliteBuffer(config(tmp_path))
    await buf.open()
    epoch = buf.epoch
    for i in range(60):
        await buf.append("press1", make_samples(1 + 10 * i, 10, pad=(i % 3) * 700))
    await buf.close()
    path = tmp_path / "buf.db"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    again = SqliteBuffer(config(tmp_path))
    await again.open()
    try:
        assert again.epoch == epoch
        assert again.last_seq() == 600
        assert {r.epoch for r in await again.take(1000)} == {epoch}
        assert {g.epoch for g in await again.take_gaps()} == {epoch}
        st = again.stats()
        assert st.damaged_files == 1
        assert st.last_salvage is not None
        assert st.last_salvage.at_start
        assert st.last_salvage.lost_seq_ranges
    finally:
        await again.close()


@pytest.mark.parametrize("seed", range(12))
async def test_no_seq_that_left_is_reused_after_any_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Random appends, deliveries, clean restarts and SIGKILL-like stops; then a power
    cut that takes the database back to any earlier moment while the flushed lease file
    stays. Whatever rollback point is chosen, no (epoch, seq) that left the agent
    (returned by take) is ever given to another sample: each run of the buffer appends
    under its own device name, so a reused identity shows as a different device."""
    rng = random.Random(seed)
    monkeypatch.setattr(sqlite_mod, "LEASE_BLOCK", rng.choice([1, 5, 20, 100]))
    live = tmp_path / "live"
    live.mkdir()
    left: dict[tuple[str, int], str] = {}  # (epoch, seq) -> device of the sample

    def leave(recs: list[Record]) -> None:
        for r in recs:
            for q in range(r.first_seq, r.last_seq + 1):
                assert left.setdefault((r.epoch, q), r.device) == r.device, (r.epoch, q)

    snapshots: list[Path] = []
    run = 0
    buf = SqliteBuffer(config(live))
    await buf.open()
    for step in range(60):
        op = rng.random()
        if op < 0.5:
            n = rng.randint(1, 30)
            await buf.append(f"run{run}", make_samples(buf.last_seq() + 1, n, f"run{run}"))
        elif op < 0.75:
            recs = await buf.take(rng.randint(1, 5))
            leave(recs)
            if rng.random() < 0.7:
                await buf.commit([r.id for r in recs])
        elif op < 0.85:
            snap = tmp_path / f"snap{step}"
            snap.mkdir()
            for name in ("buf.db", "buf.db-wal"):
                if (live / name).exists():
                    shutil.copy(live / name, snap / name)
            snapshots.append(snap)
        else:
            if rng.random() < 0.5:
                await buf.close()
            else:
                await crash(buf)
            run += 1
            buf = SqliteBuffer(config(live))
            await buf.open()
    leave(await buf.take(100_000))
    await crash(buf)
    assert snapshots, "no rollback point: pick another seed"
    cut = rng.choice(snapshots)
    shutil.copy(live / "buf.db.seq", cut / "buf.db.seq")
    again = SqliteBuffer(config(cut))
    await again.open()
    try:
        for _ in range(5):
            n = rng.randint(1, 30)
            await again.append("after-cut", make_samples(again.last_seq() + 1, n, "after-cut"))
        # Rolled-back records come back with their identity and their sample (a
        # duplicate the consumer drops); the new ones have identities never seen.
        leave(await again.take(100_000))
    finally:
        await again.close()
