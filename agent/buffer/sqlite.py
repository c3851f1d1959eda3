"""The durable buffer: one SQLite file in WAL mode.

Design
======

Unit of storage
    A *record* is one batch (one poll of one device): its samples encoded once with orjson
    as a JSON array of Sample objects (the wire form), plus the seq range it holds. The
    forwarder takes records oldest first and deletes them (`commit`) only after the broker
    acknowledged them, so delivery is at least once and in order per device.

Invariants
    - `append` returns only after its transaction committed (durable per `durability`).
    - Record ids come from ``INTEGER PRIMARY KEY AUTOINCREMENT``: strictly increasing and
      never reused, even after the newest records were deleted, so a forwarder holding
      ``after_id`` can never confuse a new record with one it already handled.
    - The seq high-water mark (``meta.last_seq``) is written in the *same* transaction as
      every append, so after any crash `last_seq()` >= every seq of any surviving record,
      and >= every seq ever appended even when all records were delivered and deleted.
    - A record evicted by ``drop_oldest`` is deleted in the same transaction as the append
      that needed the room: the size limit holds on disk at every commit.
    - Every dropped batch is counted (stats) and its seq range written to ``gaps`` in the
      dropping transaction.
    - All SQLite work runs in one dedicated thread (a single-thread executor that owns the
      connection). Calls are executed in submission order, so appends from many tasks are
      serialised without a lock, and an fsync never blocks the event loop. The in-memory
      figures are written only by that thread; `stats()` returns an immutable snapshot the
      thread publishes after each change, so it costs no I/O.

On-disk format (``PRAGMA user_version`` = 1)
    ::

        records(id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, first_seq INTEGER,
                last_seq INTEGER, count INTEGER, created REAL /* epoch s */, data BLOB)
        meta(key TEXT PRIMARY KEY, value INTEGER)     -- 'last_seq': seq high-water mark
        gaps(id INTEGER PRIMARY KEY, first_seq INTEGER, last_seq INTEGER, count INTEGER,
             reason TEXT /* drop_oldest | drop_newest | too_large */, created REAL)

    The file is opened with ``locking_mode=EXCLUSIVE``: a second agent (or a stray
    ``sqlite3`` shell) pointed at the same file fails at open instead of interleaving
    seqs. With exclusive locking SQLite keeps the WAL index in process memory, so there is
    no ``-shm`` file; the ``-wal`` file belongs to the database and must travel with it.

Size accounting and the on-disk margin
    The limit counts ``len(data) + RECORD_OVERHEAD_BYTES`` (128) per waiting record
    (`agent.buffer.common`), kept in memory and initialised at open from the table. The
    file itself is larger than the counted bytes by:

    - page rounding: a record larger than a page (4 KiB) spills into overflow pages whose
      last one is on average half empty, i.e. up to ~4 KiB per large record (≈ 2 % for
      100 KiB records; nothing for records that fit in a page);
    - B-tree slack: pages are rarely full; ≈ 10-30 % for small inline records;
    - free pages after deletions (``auto_vacuum=INCREMENTAL``: reused by later appends,
      given back to the file system when the buffer drains empty and whenever free pages
      exceed a quarter of the counted bytes);
    - the WAL: checkpointed automatically every ~4 MiB, truncated to at most
      ``JOURNAL_SIZE_LIMIT`` (4 MiB) after a checkpoint, to zero when the buffer drains.

    Plan the disk for about ``1.3 × max_bytes + 8 MiB``.

Recovery
    Opening an existing file is the recovery: SQLite replays or discards the WAL, records
    and the seq high-water stay, and the in-memory figures are recomputed from the tables
    (``last_seq`` is the maximum of the meta value and any seq still stored). A file that
    is not a SQLite database or fails ``PRAGMA quick_check`` (SQLITE_NOTADB /
    SQLITE_CORRUPT) is renamed to ``<path>.corrupt-<UTC timestamp>`` (with its ``-wal``),
    an ERROR says what was lost, and the buffer starts empty; the seq high-water is
    salvaged from the old file when it can still be read. Other errors (file locked,
    permissions, disk full) are raised: moving a healthy file aside would lose data.

What each durability setting survives
    ``process_crash`` (``synchronous=NORMAL``): a crash or SIGKILL of the agent loses
    nothing that `append` returned for — the WAL is written before commit returns and the
    OS keeps it. A power loss or kernel crash keeps the database consistent but can lose
    the transactions committed since the last checkpoint (appends and deletions, so
    records may also come back and be delivered again, and ``last_seq`` may go back).
    ``power_loss`` (``synchronous=FULL``): the WAL is fsynced at every commit, so appends
    also survive a power loss, given a disk that honours fsync. Costs about one fsync
    per append (FIELD-NOTES.md: ≈ 3.5k single-row appends/s).

Errors at run time
    A failing append (disk full, I/O error) rolls back, reloads the in-memory figures from
    the file, and raises `sqlite3.Error` to the caller; nothing is half written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog

from agent.buffer import BufferStats, Record
from agent.buffer.common import (
    DropEpisode,
    DropReason,
    Gap,
    GapList,
    Notifier,
    encode_batch,
    record_size,
)
from agent.config import BufferConfig
from agent.schema import WireSample

FORMAT_VERSION = 1
JOURNAL_SIZE_LIMIT = 4 << 20
#: How long open() waits for a lock held by another process before giving up.
LOCK_TIMEOUT_S = 1.0
#: Check the free-page count every this many commits (a cheap pragma, but not free).
_VACUUM_CHECK_EVERY = 256
_VACUUM_MIN_BYTES = 4 << 20

_SCHEMA = f"""
BEGIN EXCLUSIVE;
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0);
PRAGMA user_version = {FORMAT_VERSION};
COMMIT;
"""

_T = TypeVar("_T")

log = structlog.get_logger()


class _Corrupt(sqlite3.DatabaseError):
    """quick_check found problems without SQLite raising an error itself."""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, _Corrupt):
        return True
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


class SqliteBuffer:
    """The Buffer protocol on a SQLite file (see the module docstring for the design)."""

    def __init__(self, config: BufferConfig) -> None:
        self._config = config
        self._path = Path(config.path)
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier = Notifier()
        self._episode = DropEpisode(config.when_full, config.max_bytes, str(self._path))
        # Written only by the worker thread; the event loop reads _last_seq, _max_id and
        # the _stats snapshot (single attribute reads are atomic).
        self._con: sqlite3.Connection | None = None
        self._last_seq = 0
        self._max_id = 0  # highest id present, 0 when empty
        self._records = 0
        self._samples = 0
        self._bytes = 0
        self._oldest_created: float | None = None
        self._appended = 0
        self._committed = 0
        self._dropped_samples = 0
        self._dropped_records = 0
        self._commits_since_check = 0
        self._gaps = GapList()
        self._stats = self._snapshot()

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the file (and its directory) or recover it; see "Recovery" above.

        Raises RuntimeError when the file is locked by another process or has a newer
        format, and sqlite3.Error / OSError for other failures (the file is left as is)."""
        if self._executor is not None:
            raise RuntimeError("buffer is already open")
        self._loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-sqlite")
        self._executor = executor
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor = None
            executor.submit(self._close_connection)
            executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """Checkpoint and close the file and stop the worker thread; never raises.
        Appends already submitted complete first; later calls raise RuntimeError."""
        executor = self._executor
        if executor is None:
            return
        self._executor = None
        try:
            done = executor.submit(self._close_sync)
            executor.shutdown(wait=False)
            # Shielded: a cancelled close() must not leave the connection open.
            await asyncio.shield(asyncio.wrap_future(done))
        except Exception as exc:  # close() never raises
            log.warning("buffer.close.failed", path=str(self._path), error=repr(exc))

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        executor = self._executor
        if executor is None:
            raise RuntimeError("buffer is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, fn, *args)

    # ------------------------------------------------------------------ public API

    def last_seq(self) -> int:
        """Highest seq ever appended (0 for a new buffer); valid after open()."""
        return self._last_seq

    async def append(self, device: str, samples: Sequence[WireSample]) -> None:
        """Store one batch in one transaction, or drop per `when_full` (counted, logged,
        recorded as a gap). Raises ValueError when seqs are not strictly increasing and
        above last_seq(). An empty batch is ignored.

        Appends are applied in the order of the calls: the call hands the batch to the
        worker thread before its first suspension, so a caller that allocates seqs and
        calls append without awaiting in between never sees its seqs out of order. The
        samples must not be changed until append returns."""
        if not samples:
            return
        await self._run(self._append_sync, device, samples)

    async def take(self, max_records: int, after_id: int = 0) -> list[Record]:
        """Oldest records with id > after_id, at most max_records; not removed."""
        if max_records <= 0:
            return []
        return await self._run(self._take_sync, max_records, after_id)

    async def wait(self, after_id: int) -> None:
        """Return once a record with id > after_id exists (at once if one does)."""
        while self._max_id <= after_id:
            await self._notifier.wait()

    async def commit(self, ids: Sequence[int]) -> None:
        """Delete delivered records in one transaction; unknown ids are ignored."""
        if ids:
            await self._run(self._commit_sync, sorted({int(i) for i in ids}))

    async def take_gaps(self) -> list[Gap]:
        """Seq ranges dropped by the when_full policy (oldest first), kept across
        restarts until `clear_gaps`."""
        return await self._run(lambda: list(self._gaps.gaps))

    async def clear_gaps(self, through_seq: int) -> None:
        """Forget the gaps whose last_seq <= through_seq (once they were reported)."""
        await self._run(self._clear_gaps_sync, through_seq)

    def stats(self) -> BufferStats:
        """Current figures (an in-memory snapshot; no I/O)."""
        return self._stats

    # ------------------------------------------------------------------ worker thread

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self._path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        try:
            con.execute("PRAGMA locking_mode=EXCLUSIVE")
            # Only takes effect on a new file (before the first table is created).
            con.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self._path}: cannot switch to WAL mode (got {mode!r})")
            sync = "FULL" if self._config.durability == "power_loss" else "NORMAL"
            con.execute(f"PRAGMA synchronous={sync}")
            con.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            problems = [str(r[0]) for r in con.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise _Corrupt("; ".join(problems[:5]))
            version = int(con.execute("PRAGMA user_version").fetchone()[0])
            if version > FORMAT_VERSION:
                raise RuntimeError(
                    f"{self._path}: buffer format {version} is newer than this agent's "
                    f"({FORMAT_VERSION}); use a newer agent or move the file away"
                )
            # In one exclusive transaction, which also takes the lock that is then kept
            # for the life of the connection (locking_mode=EXCLUSIVE).
            con.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            con.close()
            if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                raise RuntimeError(
                    f"{self._path}: buffer file is in use (locked by another process?)"
                ) from exc
            raise
        except BaseException:
            con.close()
            raise
        return con

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            salvaged = self._move_aside(exc)
            self._con = self._connect()
            if salvaged:
                self._con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (salvaged,))
        self._load_state()

    def _move_aside(self, exc: sqlite3.DatabaseError) -> int:
        """Rename a corrupt file out of the way; returns the seq high-water salvaged
        from it (0 if unreadable)."""
        lost: dict[str, Any] = {}
        salvaged = 0
        try:
            con = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=0)
            try:
                salvaged = int(
                    con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0]
                )
                row = con.execute("SELECT count(*), sum(count) FROM records").fetchone()
                lost = {"records": row[0], "samples": row[1] or 0}
            finally:
                con.close()
        except Exception:  # best effort: the file is known to be damaged
            pass
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = Path(f"{self._path}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = Path(f"{self._path}.corrupt-{stamp}-{n}")
            n += 1
        size = self._path.stat().st_size if self._path.exists() else 0
        os.replace(self._path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(f"{self._path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{aside}{suffix}"))
        log.error(
            "buffer.corrupt.moved_aside",
            path=str(self._path),
            moved_to=str(aside),
            file_bytes=size,
            error=str(exc),
            lost_records=lost.get("records", "unknown"),
            lost_samples=lost.get("samples", "unknown"),
            salvaged_last_seq=salvaged or None,
            detail="every record waiting in the old file is lost; starting empty",
        )
        return salvaged

    def _load_state(self) -> None:
        con = self._require_con()
        meta_seq = int(con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
        records, samples, data_bytes, max_id, max_seq = con.execute(
            "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(length(data)), 0), "
            "coalesce(max(id), 0), coalesce(max(last_seq), 0) FROM records"
        ).fetchone()
        gaps = [
            Gap(int(a), int(b), int(c), str(d))
            for a, b, c, d in con.execute(
                "SELECT first_seq, last_seq, count, reason FROM gaps ORDER BY id"
            )
        ]
        gap_seq = max((g.last_seq for g in gaps), default=0)
        self._last_seq = max(meta_seq, int(max_seq), gap_seq)
        self._records = int(records)
        self._samples = int(samples)
        self._bytes = int(data_bytes) + self._records * record_size(0)
        self._max_id = int(max_id)
        forgotten = self._gaps.forgotten
        self._gaps = GapList(gaps)
        self._gaps.forgotten = forgotten
        self._refresh_oldest()
        self._publish()

    def _require_con(self) -> sqlite3.Connection:
        if self._con is None:
            raise RuntimeError("buffer is not open")
        return self._con

    def _refresh_oldest(self) -> None:
        row = (
            self._require_con()
            .execute("SELECT created FROM records ORDER BY id LIMIT 1")
            .fetchone()
        )
        self._oldest_created = None if row is None else float(row[0])

    def _append_sync(self, device: str, samples: Sequence[WireSample]) -> None:
        con = self._require_con()
        batch = encode_batch(samples, self._last_seq)
        size = batch.size
        limit = self._config.max_bytes
        now = time.time()
        refused: DropReason | None = None
        if size > limit:
            refused = "too_large"
        elif self._bytes + size > limit and self._config.when_full == "drop_newest":
            refused = "drop_newest"
        evicted: list[tuple[int, int, int, int, int]] = []
        new_id = 0
        try:
            con.execute("BEGIN IMMEDIATE")
            if refused is not None:
                self._add_gap(con, Gap(batch.first_seq, batch.last_seq, batch.count, refused))
            else:
                if self._bytes + size > limit:
                    evicted = self._evict(con, self._bytes + size - limit)
                cur = con.execute(
                    "INSERT INTO records (device, first_seq, last_seq, count, created, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (device, batch.first_seq, batch.last_seq, batch.count, now, batch.data),
                )
                new_id = int(cur.lastrowid or 0)
            con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (batch.last_seq,))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            self._load_state()  # the gap list may have been changed before the failure
            raise
        self._last_seq = batch.last_seq
        if refused is not None:
            self._dropped_samples += batch.count
            self._dropped_records += 1
            self._episode.dropped(refused, 1, batch.count, self._bytes)
            self._publish()
            return
        if evicted:
            ev_samples = sum(e[3] for e in evicted)
            self._records -= len(evicted)
            self._samples -= ev_samples
            self._bytes -= sum(record_size(e[4]) for e in evicted)
            self._dropped_samples += ev_samples
            self._dropped_records += len(evicted)
            self._episode.dropped("drop_oldest", len(evicted), ev_samples, self._bytes)
        self._records += 1
        self._samples += batch.count
        self._bytes += size
        self._appended += batch.count
        self._max_id = new_id
        if evicted or self._oldest_created is None:
            self._refresh_oldest()
        if not evicted:
            self._episode.fitted(self._bytes)
        self._publish()
        self._wake()

    def _evict(self, con: sqlite3.Connection, need: int) -> list[tuple[int, int, int, int, int]]:
        """Delete the oldest records until `need` bytes are freed (inside the caller's
        transaction); returns (id, first_seq, last_seq, count, data length) of each."""
        evicted: list[tuple[int, int, int, int, int]] = []
        freed = 0
        after = 0
        while freed < need:
            rows = con.execute(
                "SELECT id, first_seq, last_seq, count, length(data) FROM records "
                "WHERE id > ? ORDER BY id LIMIT 256",
                (after,),
            ).fetchall()
            if not rows:
                break  # the accounting says there is more; the table disagrees: stop
            for row in rows:
                rid, first, last, count, length = (int(v) for v in row)
                evicted.append((rid, first, last, count, length))
                freed += record_size(length)
                after = rid
                if freed >= need:
                    break
        if evicted:
            con.execute("DELETE FROM records WHERE id <= ?", (evicted[-1][0],))
            for _, first, last, count, _ in evicted:
                self._add_gap(con, Gap(first, last, count, "drop_oldest"))
        return evicted

    def _add_gap(self, con: sqlite3.Connection, gap: Gap) -> None:
        merged, forgotten = self._gaps.add(gap)
        if merged:
            last = self._gaps.gaps[-1]
            con.execute(
                "UPDATE gaps SET last_seq = ?, count = ? WHERE id = (SELECT max(id) FROM gaps)",
                (last.last_seq, last.count),
            )
        else:
            con.execute(
                "INSERT INTO gaps (first_seq, last_seq, count, reason, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (gap.first_seq, gap.last_seq, gap.count, gap.reason, time.time()),
            )
        if forgotten:
            con.execute(
                "DELETE FROM gaps WHERE id IN (SELECT id FROM gaps ORDER BY id LIMIT ?)",
                (forgotten,),
            )

    def _clear_gaps_sync(self, through_seq: int) -> None:
        con = self._require_con()
        con.execute("DELETE FROM gaps WHERE last_seq <= ?", (through_seq,))
        self._gaps.clear(through_seq)

    def _take_sync(self, max_records: int, after_id: int) -> list[Record]:
        rows = (
            self._require_con()
            .execute(
                "SELECT id, device, first_seq, last_seq, count, created, data FROM records "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max_records),
            )
            .fetchall()
        )
        return [Record(*row) for row in rows]

    def _commit_sync(self, ids: list[int]) -> None:
        con = self._require_con()
        try:
            con.execute("BEGIN IMMEDIATE")
            rows = con.execute(
                "DELETE FROM records WHERE id IN (SELECT value FROM json_each(?)) "
                "RETURNING count, length(data)",
                (orjson.dumps(ids),),
            ).fetchall()
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        if not rows:
            return
        samples = sum(int(r[0]) for r in rows)
        self._records -= len(rows)
        self._samples -= samples
        self._bytes -= sum(record_size(int(r[1])) for r in rows)
        self._committed += samples
        if self._records == 0:
            self._max_id = 0
            self._oldest_created = None
        else:
            self._max_id = int(
                con.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0]
            )
            self._refresh_oldest()
        self._publish()
        self._maintain(drained=self._records == 0)

    def _maintain(self, drained: bool) -> None:
        """Give free pages back to the file system (see the margin note above). Failures
        here cost disk space, not data: log and carry on."""
        con = self._require_con()
        self._commits_since_check += 1
        try:
            # execute() steps a pragma that returns no rows only once, and each step of
            # incremental_vacuum frees one page; executescript() runs it to completion.
            if drained:
                con.executescript("PRAGMA incremental_vacuum;")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                self._commits_since_check = 0
            elif self._commits_since_check >= _VACUUM_CHECK_EVERY:
                self._commits_since_check = 0
                free = int(con.execute("PRAGMA freelist_count").fetchone()[0])
                page = int(con.execute("PRAGMA page_size").fetchone()[0])
                if free * page > max(_VACUUM_MIN_BYTES, self._bytes // 4):
                    con.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            log.warning("buffer.vacuum.failed", path=str(self._path), error=str(exc))

    def _close_sync(self) -> None:
        con = self._con
        if con is None:
            return
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("buffer.close.checkpoint_failed", path=str(self._path), error=str(exc))
        self._close_connection()

    def _close_connection(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def _publish(self) -> None:
        self._stats = self._snapshot()

    def _snapshot(self) -> BufferStats:
        return BufferStats(
            records=self._records,
            samples=self._samples,
            bytes=self._bytes,
            max_bytes=self._config.max_bytes,
            oldest_created=self._oldest_created,
            last_seq=self._last_seq,
            appended_samples=self._appended,
            committed_samples=self._committed,
            dropped_samples=self._dropped_samples,
            dropped_records=self._dropped_records,
        )

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._notifier.notify)
