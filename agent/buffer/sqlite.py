"""The durable buffer: one SQLite file in WAL mode.

Design
======

Unit of storage
    A *record* is one batch (one poll of one device), encoded once by `agent.buffer.record`
    (columnar, checksummed: see its docstring for the layout), plus the seq range it holds.
    The row stores the record's body; the device's tag dictionary (names, units, value
    kinds) is stored once in ``dicts`` and joined to the body by `take`, so every reader
    gets self-contained data and decodes it with `agent.buffer.common.record_samples`. The
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
    - No record commits with a seq above the durable lease in ``<path>.seq`` (see
      "Epoch and seq leases"), so after a power cut, which can roll the database back,
      `last_seq()` is still >= every seq that can have left the agent.
    - A record evicted by ``drop_oldest`` is deleted in the same transaction as the append
      that needed the room: the size limit holds on disk at every commit.
    - Every dropped batch is counted (stats) and its seq range written to ``gaps`` in the
      dropping transaction.
    - All SQLite work runs in one dedicated thread (a single-thread executor that owns the
      connection). Calls are executed in submission order, so appends from many tasks are
      serialised without a lock, and an fsync never blocks the event loop. The in-memory
      figures are written only by that thread; `stats()` returns an immutable snapshot the
      thread publishes after each change, so it costs no I/O.

On-disk format (``PRAGMA user_version`` = 3)
    ::

        records(id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, first_seq INTEGER,
                last_seq INTEGER, count INTEGER, created REAL /* epoch s */, data BLOB,
                epoch TEXT, dict INTEGER /* dicts.id; 0: data is a format-2 JSON array */)
        dicts(id INTEGER PRIMARY KEY, data BLOB UNIQUE)   -- tag dictionaries (record.py)
        set_aside(...)   -- records that failed their checks at take, the newest 64
        meta(key TEXT PRIMARY KEY, value INTEGER)     -- 'last_seq': seq high-water mark
        gaps(id INTEGER PRIMARY KEY, first_seq INTEGER, last_seq INTEGER, count INTEGER,
             reason TEXT /* see agent.buffer.Gap */, created REAL, epoch TEXT)
        info(key TEXT PRIMARY KEY, value TEXT)        -- 'epoch', 'legacy_epoch'

    ``<path>.seq`` (64 bytes, written in place): ``"<leased seq> <epoch>"``.

    A format-1 file (before epochs) is upgraded at open: the epoch columns are added
    with ``''``, which stands for the ``legacy_epoch`` made at the upgrade (no row is
    rewritten); a format-1 ``.seq`` (a bare number) is read as a lease without epoch.
    A format-2 file is upgraded at open by adding ``dicts``, ``set_aside`` and the
    ``dict`` column (0): its rows stay JSON arrays and are read as they are (`take` and
    `record_samples` tell the two apart by the data's first bytes). Converting them would
    cost minutes and a second write of the whole backlog at the first start (flash wear,
    and a crash in the middle to handle), for rows that are delivered and deleted soon
    anyway; they carry no checksum, as before. A newer file is refused by an older agent
    ("newer format"): format 3 by a format-2 agent, and the install and rollback scripts
    (deploy/offline-install.sh, deploy/edge-agent-rollback) refuse to switch to a release
    whose ``BUFFER_FORMAT`` is below the buffer's while it holds records.

    A new file has 1 KiB pages (``PAGE_SIZE``): records of one poll of a large device
    take 2-4 KiB, and in 4 KiB pages such a record takes a whole page (two do not fit),
    while every commit writes whole pages to the WAL. With 1 KiB pages the file holds
    2.4-3.6 bytes a value instead of 4.4, and a third of the bytes are written to the
    disk (bench/README.md, "Record format"). A file made before format 3 (4 KiB pages)
    is rebuilt with 1 KiB pages the first time it drains empty (a VACUUM of the few pages
    left, with the journal in DELETE mode meanwhile; INFO ``buffer.page_size.changed``);
    until then 2-4 KiB records can take up to twice their counted size on its disk.

    Checks: `take` verifies every format-3 row (the body's CRC32, its header against the
    row's seqs and count, the dictionary's CRC32 against the one the body names). A row
    that fails is moved to ``set_aside`` in one transaction with its gap (reason
    ``corrupt``, its seq range) and ERROR ``buffer.record.corrupt``; it is never
    published. A damaged dictionary (ERROR ``buffer.dictionary.corrupt`` at open) makes
    every record that refers to it fail that way. Dictionaries no waiting record refers
    to are deleted when the buffer drains (with the other drained maintenance).

    The file is opened with ``locking_mode=EXCLUSIVE``: a second agent (or a stray
    ``sqlite3`` shell) pointed at the same file fails at open instead of interleaving
    seqs. With exclusive locking SQLite keeps the WAL index in process memory, so there is
    no ``-shm`` file; the ``-wal`` file belongs to the database and must travel with it.

Size accounting and the on-disk margin
    The limit counts ``len(data) + RECORD_OVERHEAD_BYTES`` (128) per waiting record
    (`agent.buffer.common`), kept in memory and initialised at open from the table. The
    file itself is larger than the counted bytes by:

    - page rounding: a record larger than a page (1 KiB; 4 KiB in a file made before
      format 3 that has not drained yet) spills into overflow pages whose last one is on
      average half empty, i.e. up to a page per large record;
    - the tag dictionaries (one per device and configuration, a few bytes per tag), not
      counted;
    - B-tree slack: pages are rarely full; ≈ 10-30 % for small inline records;
    - free pages after deletions (``auto_vacuum=INCREMENTAL``: reused by later appends,
      given back to the file system when the buffer drains empty (at most every
      ``_DRAINED_MAINTENANCE_EVERY_S``, 5 s, unless they exceed 4 MiB) and whenever free
      pages exceed a quarter of the counted bytes);
    - the WAL: checkpointed automatically every 1,000 pages (~1 MiB), truncated to at most
      ``JOURNAL_SIZE_LIMIT`` (4 MiB) after a checkpoint, to zero when the buffer drains
      (at the same rate as the free pages).

    Plan the disk for about ``1.3 × max_bytes + 8 MiB``.

Epoch and seq leases
    The *epoch* (32 hex digits, 128 random bits) names the seq space: a sample's identity
    is ``(agent, epoch, seq)``. It lives in ``info.epoch`` and in ``<path>.seq``; every
    record and gap carries the epoch it was made in. At open the epoch is kept only when
    both agree; otherwise (a new file, a file replaced or restored from elsewhere, a lost
    or damaged ``.seq``, the first start of a format-1 file) a new one is made, WARNING
    ``buffer.epoch.new`` with the reason (nothing is logged for a brand-new buffer). Seqs
    continue above everything known in either case, as a courtesy to people reading
    them: the new epoch alone keeps identities apart.

    Seqs are *leased*: before an append whose seqs go beyond the lease, the buffer writes
    ``<last seq of the batch> + LEASE_BLOCK`` (10,000) with the epoch into ``.seq`` in
    place and flushes it (fdatasync; the directory is flushed when the file is created),
    in the worker thread, before the record's transaction. The database may be rolled back
    by a power cut (``process_crash`` does not sync commits), the lease may not. At open
    ``last_seq`` = max(meta value, highest seq stored, highest gap, lease); when the lease
    is above what the database knows (after any unclean stop), the rest, which may hold
    seqs that left the agent before a power cut, is recorded as a gap with reason
    ``skipped`` and never handed out again. A clean close, after the final checkpoint,
    writes the lease back down to ``last_seq``, so a clean restart skips nothing.

    Cost: one pwrite + fdatasync per block, ≈ 1.6-2.9 ms on the development VM
    (``bench/buffer_lease.py``), i.e. 10 flushes and ≈ 2-3 % of the worker thread per
    second at 100,000 values/s. A lease that cannot be written (the disk fails) is
    logged once (ERROR ``buffer.lease.failed``, ``stats().lease_ok`` false) and retried
    at every append beyond it; storing goes on meanwhile.

    Which seqs leave the agent: only records that `take` returned, which committed after
    their lease. So the lease lives entirely in the buffer and `SeqCounter` needs no
    hook; a seq that the writer took but that was never appended (a crash in between)
    may be handed out again, which is harmless, since nothing carried it.

Recovery
    Opening an existing file is the recovery: SQLite replays or discards the WAL, records
    and the seq high-water stay, and the in-memory figures are recomputed from the tables;
    then the epoch and lease are settled as above.

    A file that is not a SQLite database or fails ``PRAGMA quick_check`` (SQLITE_NOTADB /
    SQLITE_CORRUPT) is renamed to ``<path>.corrupt-<UTC timestamp>`` (with its ``-wal``)
    and *salvaged* into a fresh file (`agent.buffer.salvage`): the records table is read
    in id ranges, a range that
    fails is split in halves down to single ids, and every row that reads back whole (its
    data decodes and holds exactly its seq range) is copied with its id. The seq high-water
    and the gaps are copied when readable. The seqs between the intact records around an
    unreadable stretch are recorded as a gap with reason ``corrupt`` (an upper bound: the
    range can also hold seqs that had been delivered), and one ERROR
    (``buffer.corrupt.moved_aside``, ``at_start=true``) tells how many records and samples
    were recovered and which seq ranges were lost. Other errors (file locked, permissions,
    disk full) are raised: moving a healthy file aside would lose data. The epoch stays
    when ``<path>.seq`` confirms the damaged file's (its lease covers every seq used);
    records copied keep their epoch.

A file damaged at run time
    A read or write that fails with SQLITE_CORRUPT / SQLITE_NOTADB ("database disk image is
    malformed", "file is not a database"), in `append`, `take`, `commit`, `clear_gaps` or
    maintenance, or reads of the records that keep failing with an I/O error for a whole
    ``PROBE_INTERVAL_S`` (a bad sector rather than a hiccup), start a salvage in the
    worker thread: every record that reads back whole through the live connection is
    copied, with its id and epoch, into ``<path>.salvage`` (records already delivered are
    left out), together with the gaps, the seq high-water and the epoch held in memory;
    that file is checkpointed and closed, the damaged connection closed, the damaged file
    (with its WAL) renamed to ``<path>.damaged-<UTC timestamp>``, the new one renamed into
    place, the directory flushed, and the operation that met the damage is done again on
    the new file. The seq ranges of unreadable stretches become gaps with reason
    ``corrupt`` (between the intact records around them, no lower than the oldest waiting
    seq); the samples lost are counted from the buffer's own figures (waiting minus
    recovered; records being deleted at that moment count as lost) (in
    ``dropped_samples`` and ``dropped_by_reason['corrupt']``, and in ``last_salvage``);
    one ERROR ``buffer.corrupt.moved_aside`` with ``at_start=false``. The epoch stays: the
    seq counter and the lease are in memory and in ``.seq``, untouched by the damage, so
    seqs stay unique in it, and consumers keep deduplicating without a reset.

    When the salvage cannot be made (the copy fails: disk full, I/O errors everywhere),
    ERROR ``buffer.corrupt.salvage_failed`` once, the buffer turns degraded with reason
    ``corrupt`` (new records in memory, as under "Disk trouble"; `take` serves what the
    damaged file still returns, then memory), and every probe tries the salvage again
    before moving the memory records into the new file. None of this raises out of
    `take`, `commit` or `append`. Records in memory may then be delivered before older
    ones still stuck in the damaged file.

    The copy needs free disk space of the size of what is recovered.

What each durability setting survives
    ``process_crash`` (``synchronous=NORMAL``): a crash or SIGKILL of the agent loses
    nothing that `append` returned for — the WAL is written before commit returns and the
    OS keeps it. A power loss or kernel crash keeps the database consistent but can lose
    the transactions committed since the last checkpoint (appends and deletions, so
    records may also come back and be delivered again, and ``last_seq`` may go back).
    ``power_loss`` (``synchronous=FULL``): the WAL is fsynced at every commit, so appends
    also survive a power loss, given a disk that honours fsync. Costs about one fsync
    per append (≈ 3.5k single-row appends/s, see docs/delivery.md).

Maximum age
    With ``max_age_s`` set, every append first deletes the records created more than
    ``max_age_s`` ago (in the same transaction), recorded as gaps with reason ``max_age``
    and logged once per episode (``buffer.max_age.dropping`` … ``.recovered`` at the next
    delivery).

Disk trouble
    An append whose transaction fails with a disk error (SQLITE_FULL, SQLITE_IOERR*,
    SQLITE_READONLY*, SQLITE_CANTOPEN) rolls back, and the buffer turns *degraded*: one
    ERROR ``buffer.disk.failed``, ``stats().degraded`` true, and new records are kept in
    memory (at most ``memory_fallback_bytes``, oldest dropped first, reason
    ``memory_full``). Their ids continue the file's sequence, so `take` returns them after
    the records on disk and ids stay strictly increasing. Deletions that fail are
    remembered and hidden from `take`. Every ``PROBE_INTERVAL_S`` an append or commit tries
    to move the memory records to the file in one transaction (also applying pending
    deletions, the gaps, and the size limit); when that commits, INFO
    ``buffer.disk.recovered`` and normal operation resumes.

    While degraded the seq high-water cannot be written to the database; the lease in
    ``<path>.seq`` (created at open, so overwriting it in place needs no new disk blocks
    on ordinary file systems) covers it, so seqs are not reused even after a crash while
    degraded. A crash while degraded loses the records held in memory; their seqs are
    inside the rest of the lease, which the restart reports as a ``skipped`` gap.

    A disk that already fails at open() (same error classes) starts the buffer degraded:
    the connection is then a read-only stand-in (the file opened ``mode=ro``, or
    ``immutable=1`` when its WAL is empty, or an empty in-memory schema when there is no
    file) that serves the records already on disk to `take`; the seq and id high-water
    marks come from it and from ``<path>.seq`` (a ``.seq`` that cannot be read or is
    damaged means a new epoch, as at any start). When the file exists but cannot be read
    at all, open() raises RuntimeError: its record ids are unknown, and the records held
    in memory meanwhile could not be merged into it later. Each probe closes the stand-in
    and tries the real open; when it works, recovery proceeds as above.

Errors at run time
    Any other failing append rolls back and raises `sqlite3.Error` to the caller; nothing
    is half written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
import structlog

from agent.buffer import BufferStats, Gap, Record, Salvage
from agent.buffer.common import (
    DropEpisode,
    DropReason,
    EncodedBatch,
    GapList,
    Notifier,
    new_epoch,
    record_size,
)
from agent.buffer.record import (
    CorruptRecord,
    Dictionary,
    RecordEncoder,
    check_body,
    check_dictionary,
    is_body,
    split_record,
)
from agent.buffer.salvage import Copied, copy_intact, lost_ranges, seq_ranges, try_
from agent.config import BufferConfig
from agent.schema import WireSample

FORMAT_VERSION = 3
JOURNAL_SIZE_LIMIT = 4 << 20
#: Page size of a new file (see "Size accounting and the on-disk margin").
PAGE_SIZE = 1024
#: How long open() waits for a lock held by another process before giving up.
LOCK_TIMEOUT_S = 1.0
#: While degraded, how often an append or commit tries the disk again.
PROBE_INTERVAL_S = 5.0
#: Check the free-page count every this many commits (a cheap pragma, but not free).
_VACUUM_CHECK_EVERY = 256
_VACUUM_MIN_BYTES = 4 << 20
#: When the buffer drains empty, free pages go back to the file system and the WAL is
#: truncated at most this often (when the broker keeps up the buffer empties after
#: nearly every delivery, up to a hundred times a second), or at once when the free
#: pages exceed _VACUUM_MIN_BYTES.
_DRAINED_MAINTENANCE_EVERY_S = 5.0
#: `<path>.seq` holds "<leased seq> <epoch>" padded to this size (written in place).
_SEQ_FILE_BYTES = 64
#: Seqs are leased this many at a time (at least one batch): one fsync of `<path>.seq`
#: per block. After an unclean stop at most this many seqs are skipped.
LEASE_BLOCK = 10_000

_TABLES = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL,
    epoch TEXT NOT NULL DEFAULT '',
    dict INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dicts (id INTEGER PRIMARY KEY, data BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS set_aside (
    id INTEGER PRIMARY KEY,
    record_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL,
    epoch TEXT NOT NULL,
    dict INTEGER NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    epoch TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0);
"""
#: Format 1 (before epochs) to 2: records and gaps gain their epoch; rows written by a
#: format-1 agent keep '' and belong to the 'legacy_epoch' made at the upgrade.
_UPGRADE_1 = """
ALTER TABLE records ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
ALTER TABLE gaps ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
"""
#: Format 2 to 3: records refer to their tag dictionary; rows written by a format-2 agent
#: keep 0 (no dictionary: their data is the JSON array of samples, read as it is).
_UPGRADE_2 = """
ALTER TABLE records ADD COLUMN dict INTEGER NOT NULL DEFAULT 0;
"""
_SCHEMA = f"BEGIN EXCLUSIVE;{_TABLES}PRAGMA user_version = {FORMAT_VERSION};COMMIT;"

_INSERT_RECORD = (
    "INSERT INTO records (id, device, first_seq, last_seq, count, created, data, epoch, dict) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Records set aside because they fail their checks are kept (for inspection) up to this
#: many, the oldest forgotten first.
SET_ASIDE_KEEP = 64
_INSERT_GAP = (
    "INSERT INTO gaps (first_seq, last_seq, count, reason, created, epoch) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

_T = TypeVar("_T")
#: (id, first_seq, last_seq, count, data length, epoch) of a deleted record.
_Row = tuple[int, int, int, int, int, str]

log = structlog.get_logger()


class _Corrupt(sqlite3.DatabaseError):
    """quick_check found problems without SQLite raising an error itself."""


def _is_corruption(exc: BaseException) -> bool:
    if isinstance(exc, _Corrupt):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    # A text column whose bytes were overwritten: SQLite reads the row, Python's sqlite3
    # cannot decode it (damage SQLite's own page checks do not see).
    return name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or str(exc).startswith(
        "Could not decode to UTF-8"
    )


def is_disk_error(exc: BaseException) -> bool:
    """True for the errors of a disk that is full, read-only or failing: the ones the
    buffer rides out in memory. Anything else (a bug, a locked file) is not."""
    if not isinstance(exc, sqlite3.Error):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN"))


class SqliteBuffer:
    """The Buffer protocol on a SQLite file (see the module docstring for the design)."""

    def __init__(self, config: BufferConfig) -> None:
        self._config = config
        self._path = Path(config.path)
        self._seq_path = Path(f"{config.path}.seq")
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier = Notifier()
        self._episode = DropEpisode(config.when_full, config.max_bytes, str(self._path))
        self._age_episode = DropEpisode(
            "max_age", config.max_bytes, str(self._path), event="buffer.max_age"
        )
        # Written only by the worker thread; the event loop reads _last_seq, _max_id and
        # the _stats snapshot (single attribute reads are atomic).
        self._con: sqlite3.Connection | None = None
        self._last_seq = 0
        self._max_id = 0  # highest id present, 0 when empty
        self._id_hw = 0  # highest id ever given out (the file's AUTOINCREMENT sequence)
        self._records = 0
        self._samples = 0
        self._bytes = 0
        self._oldest_created: float | None = None
        self._appended = 0
        self._committed = 0
        self._dropped_samples = 0
        self._dropped_records = 0
        self._commits_since_check = 0
        self._last_drained_maintenance = -_DRAINED_MAINTENANCE_EVERY_S
        self._gaps = GapList()
        # Disk trouble (see "Disk trouble" above).
        self._degraded: str | None = None
        self._degraded_since = 0.0
        self._next_probe = 0.0
        self._spill: dict[int, Record] = {}  # insertion order is id order
        self._spill_bytes = 0
        self._pending_deletes: set[int] = set()
        self._gaps_dirty = False
        self._seq_fd: int | None = None
        # Degraded since open(): _con is only a read-only stand-in (see "Disk trouble").
        self._open_pending = False
        self._stand_in_made: list[Path] = []  # side files the read-only look created
        self._open_failure: str | None = None  # last non-disk error of a reopen, logged once
        # Epoch and seq lease (see "Epoch and seq leases").
        self._epoch = ""
        self._legacy_epoch = ""  # of rows written by a format-1 agent ('' in the file)
        self._lease_end = 0  # highest seq covered by the lease in <path>.seq
        self._lease_ok = True
        self._leases = 0
        # Damage at run time (see "A file damaged at run time").
        self._damaged: BaseException | None = None  # damage found, salvage still pending
        self._read_failed_at: float | None = None  # first of consecutive failing reads
        self._damaged_files = 0
        self._last_salvage: Salvage | None = None
        self._dropped_by: dict[str, int] = {}
        self._oldest_first_seq: int | None = None
        self._epoch_col = "epoch"  # "''" on a read-only stand-in of a format-1 file
        # The columns of a record row (a stand-in of an older file lacks some).
        self._cols = _record_cols("epoch", "dict")
        # Tag dictionaries (see "On-disk format"): blob -> id, id -> decoded.
        self._encoder = RecordEncoder()
        self._dict_ids: dict[bytes, int] = {}
        self._dicts: dict[int, Dictionary] = {}
        self._set_aside_failed: set[int] = set()  # damaged records the disk would not move
        self._page_size_ok = False  # checked (and fixed) at the first drain, see _repage
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

    @property
    def epoch(self) -> str:
        """The epoch of new records; valid after open()."""
        return self._epoch

    def last_seq(self) -> int:
        """Highest seq handed out in the current epoch (0 for a new buffer), or the end
        of the previous lease after an unclean stop; valid after open()."""
        return self._last_seq

    async def append(self, device: str, samples: Sequence[WireSample]) -> None:
        """Store one batch in one transaction, or drop per `when_full` (counted, logged,
        recorded as a gap). Raises ValueError when seqs are not strictly increasing and
        above last_seq(). An empty batch is ignored. When the disk fails the batch is
        kept in memory instead (see "Disk trouble"); this does not raise.

        Appends are applied in the order of the calls: the call hands the batch to the
        worker thread before its first suspension, so a caller that allocates seqs and
        calls append without awaiting in between never sees its seqs out of order. The
        samples must not be changed until append returns."""
        if not samples:
            return
        await self._run(self._append_sync, device, samples)

    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]:
        """`append` for several batches in one trip to the worker thread (each batch is
        still its own transaction, in the given order). Returns, per batch, None when it
        was stored (or dropped by policy, as `append`) or the exception its append
        raised; a failing batch does not stop the ones after it."""
        if not batches:
            return []
        return await self._run(self._append_many_sync, batches)

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
        """Seq ranges that were dropped (oldest first), kept across restarts until
        `clear_gaps`."""
        return await self._run(lambda: list(self._gaps.gaps))

    async def clear_gaps(self, through_seq: int) -> None:
        """Forget the gaps whose last_seq <= through_seq (once they were reported)."""
        await self._run(self._clear_gaps_sync, through_seq)

    def stats(self) -> BufferStats:
        """Current figures (an in-memory snapshot; no I/O)."""
        return self._stats

    # ------------------------------------------------------------------ open / recovery

    def _connect(self, path: Path | None = None) -> sqlite3.Connection:
        path = path or self._path
        con = sqlite3.connect(path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        try:
            con.execute("PRAGMA locking_mode=EXCLUSIVE")
            # Both only take effect on a new file (before the first table is created).
            con.execute(f"PRAGMA page_size={PAGE_SIZE}")
            con.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{path}: cannot switch to WAL mode (got {mode!r})")
            sync = "FULL" if self._config.durability == "power_loss" else "NORMAL"
            con.execute(f"PRAGMA synchronous={sync}")
            con.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            problems = [str(r[0]) for r in con.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise _Corrupt("; ".join(problems[:5]))
            version = int(con.execute("PRAGMA user_version").fetchone()[0])
            if version > FORMAT_VERSION:
                raise RuntimeError(
                    f"{path}: buffer format {version} is newer than this agent's "
                    f"({FORMAT_VERSION}); use a newer agent or move the file away"
                )
            # In one exclusive transaction, which also takes the lock that is then kept
            # for the life of the connection (locking_mode=EXCLUSIVE).
            if version in (1, 2):
                upgrade = (_UPGRADE_1 if version == 1 else "") + _UPGRADE_2
                con.executescript(
                    f"BEGIN EXCLUSIVE;{upgrade}{_TABLES}"
                    f"PRAGMA user_version = {FORMAT_VERSION};COMMIT;"
                )
            else:
                con.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            con.close()
            if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                raise RuntimeError(
                    f"{path}: buffer file is in use (locked by another process?)"
                ) from exc
            raise
        except BaseException:
            con.close()
            raise
        return con

    def _open_sync(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                raise
            self._open_degraded(exc)
            return
        try:
            self._use(self._connect())
        except sqlite3.DatabaseError as exc:
            if is_disk_error(exc):
                self._open_degraded(exc)
                return
            if not _is_corruption(exc):
                raise
            aside, size = self._move_aside()
            self._use(self._connect())
            self._salvage(aside, size, exc)
        self._load_state()
        self._settle_epoch(self._read_seq_state())

    def _open_degraded(self, exc: BaseException) -> None:
        """The file cannot be opened for writing (disk full, read-only, failing): start
        degraded. The seq high-water and the records already on disk are read through a
        read-only stand-in connection; appends go to memory until `_finish_open` works.

        Raises RuntimeError when the high-water mark cannot be known (a file exists but
        cannot be read): starting anyway could hand out seqs that were used before."""
        self._use(self._open_stand_in())
        try:
            self._load_state()
        except sqlite3.Error as err:
            self._close_connection()
            raise RuntimeError(
                f"{self._path}: the disk fails ({exc}) and the buffer file cannot be read "
                f"either ({err}): its seq high-water mark is unknown, so the agent does not "
                "start (it would reuse seqs); free the disk or fix its file system"
            ) from err
        state = self._read_seq_state()
        self._open_pending = True
        self._settle_epoch(state, writable=False)
        self._enter_degraded(exc, at_start=True)

    def _open_stand_in(self) -> sqlite3.Connection:
        """A read-only connection to the existing file, or to an empty in-memory copy of
        the schema when there is no file (or an empty one). Writes through it fail with
        SQLITE_READONLY, which the degraded paths already ride out."""
        path = self._path
        wal = Path(f"{path}-wal")
        wal_has_data = _size(wal) > 0
        if _size(path) <= 0 and not wal_has_data:
            if path.exists() and _size(path) < 0:
                raise RuntimeError(f"{path}: cannot read the buffer file to learn its seqs")
            return _empty_stand_in()
        sides = [wal, Path(f"{path}-shm")]
        last_err: sqlite3.Error | None = None
        # mode=ro sees the WAL but needs a -shm file (it creates one); immutable needs
        # nothing but ignores the WAL, so it is only right when the WAL holds nothing.
        for flags in ("mode=ro", "immutable=1"):
            if flags == "immutable=1" and wal_has_data:
                break
            made = [side for side in sides if not side.exists()]
            con: sqlite3.Connection | None = None
            try:
                con = sqlite3.connect(
                    f"file:{quote(str(path))}?{flags}",
                    uri=True,
                    timeout=0,
                    isolation_level=None,
                    check_same_thread=False,
                )
                con.execute("PRAGMA query_only=1")
                tables = {
                    str(r[0])
                    for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
                version = int(con.execute("PRAGMA user_version").fetchone()[0])
            except sqlite3.Error as err:
                last_err = err
                if con is not None:
                    con.close()
                _unlink(made)
                continue
            if version > FORMAT_VERSION:
                con.close()
                _unlink(made)
                raise RuntimeError(
                    f"{path}: buffer format {version} is newer than this agent's "
                    f"({FORMAT_VERSION}); use a newer agent or move the file away"
                )
            if not tables:  # created but never written: nothing on disk yet
                con.close()
                _unlink(made)
                return _empty_stand_in()
            self._stand_in_made = made
            return con
        raise RuntimeError(
            f"{path}: the disk fails and the existing buffer file cannot be read "
            f"({last_err}): its seq high-water mark is unknown, so the agent does not start "
            "(it would reuse seqs); free the disk or fix its file system"
        )

    def _read_seq_state(self) -> tuple[int, str | None] | None:
        """(leased seq, epoch) from `<path>.seq`; None when it does not exist or was never
        written. The epoch is None in a file written before epochs (a bare number).

        A file that cannot be read or parsed: a WARNING and None, and the caller starts a
        new epoch (seqs stay unique without knowing the old lease)."""
        try:
            text = self._seq_path.read_bytes().strip(b"\0 \n")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("buffer.seqfile.unreadable", path=str(self._seq_path), error=str(exc))
            return None
        if not text:
            return None
        parts = text.split()
        try:
            lease = int(parts[0])
            epoch = parts[1].decode("ascii") if len(parts) == 2 else None
            if len(parts) > 2 or lease < 0 or (epoch is not None and not _valid_epoch(epoch)):
                raise ValueError(text)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("buffer.seqfile.damaged", path=str(self._seq_path), content=text[:80])
            return None
        return lease, epoch

    def _finish_open(self) -> bool:
        """Degraded since open(): try the real open again. True when the file is now
        open for writing (the caller then moves the memory records into it)."""
        self._close_connection(keep_seq_fd=True)
        try:
            con = self._connect()
        except (sqlite3.Error, RuntimeError) as exc:
            if not is_disk_error(exc) and str(exc) != self._open_failure:
                self._open_failure = str(exc)
                log.error(
                    "buffer.disk.open_failed",
                    path=str(self._path),
                    error=str(exc),
                    detail=f"the buffer stays in memory; retried every {PROBE_INTERVAL_S:g} s",
                )
            try:
                self._use(self._open_stand_in())
            except RuntimeError:
                self._use(_empty_stand_in())  # the figures in memory stay right
            return False
        self._use(con)
        self._open_pending = False
        self._open_failure = None
        if self._seq_fd is None:
            self._write_lease(max(self._lease_end, self._last_seq))
        # No lock was held while degraded: never go below what the file says now.
        with contextlib.suppress(sqlite3.Error, TypeError):
            meta = int(con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
            self._last_seq = max(self._last_seq, meta)
        return True

    def _move_aside(self, label: str = "corrupt") -> tuple[Path, int]:
        """Rename a corrupt file (and its WAL) out of the way, to
        `<path>.<label>-<UTC timestamp>`; returns the new name and the file's size."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = Path(f"{self._path}.{label}-{stamp}")
        n = 1
        while aside.exists():
            aside = Path(f"{self._path}.{label}-{stamp}-{n}")
            n += 1
        size = self._path.stat().st_size if self._path.exists() else 0
        os.replace(self._path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(f"{self._path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{aside}{suffix}"))
        return aside, size

    def _salvage(self, aside: Path, size: int, exc: sqlite3.DatabaseError) -> None:
        """At open: copy what is intact in the damaged file `aside` into the new, empty
        file; log one ERROR with what was recovered and what was lost (see "Recovery")."""
        con = self._require_con()
        copied = Copied()
        old_seq = 0
        old_gaps: list[Gap] = []
        old_epoch: str | None = None
        old_legacy: str | None = None
        note = ""
        sides = [Path(f"{aside}{suffix}") for suffix in ("-wal", "-shm")]
        made = [side for side in sides if not side.exists()]  # by opening it read-only
        try:
            old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True, timeout=0)
            # Lets SQLite read a file shorter than its header says (a truncated file)
            # instead of refusing every query; the connection stays read-only.
            old.execute("PRAGMA writable_schema=1")
        except sqlite3.Error as err:
            old = None
            note = f"cannot open: {err}"
        con.execute("BEGIN IMMEDIATE")
        try:
            if old is not None:
                old_seq = try_(
                    lambda: int(
                        old.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0]
                    ),
                    0,
                )
                col = "epoch" if try_(lambda: _has_epoch(old), False) else "''"
                dcol = "dict" if try_(lambda: _has_column(old, "dict"), False) else "0"
                old_gaps = try_(
                    lambda: [
                        Gap(int(a), int(b), int(c), str(d), str(e))
                        for a, b, c, d, e in old.execute(
                            f"SELECT first_seq, last_seq, count, reason, {col} FROM gaps "
                            "ORDER BY id"
                        )
                    ],
                    [],
                )
                old_epoch = try_(lambda: _info(old, "epoch"), None)
                old_legacy = try_(lambda: _info(old, "legacy_epoch"), None)
                copied = copy_intact(old, con, _record_cols(col, dcol), _INSERT_RECORD)
                if copied.hi == 0 and not note:
                    note = "no readable records table"
            # The lost seqs of each unreadable stretch lie between the intact records
            # around it (records are in seq order by id).
            high = max([old_seq, copied.high, *(g.last_seq for g in old_gaps)])
            lost = lost_ranges(copied, high, floor=1)
            self._gaps = GapList(old_gaps)
            for first, last in lost:
                self._gaps.add(Gap(first, last, last - first + 1, "corrupt", old_epoch or ""))
            self._rewrite_gaps(con)
            con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (high,))
            # The epoch stays only if <path>.seq confirms it (see _settle_epoch).
            for key, value in (("epoch", old_epoch), ("legacy_epoch", old_legacy)):
                if value:
                    con.execute(
                        "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", (key, value)
                    )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            if old is not None:
                old.close()
            for side in made:
                side.unlink(missing_ok=True)
        ranges = seq_ranges(lost) if (copied.kept or lost) else ["unknown"]
        self._damaged_files += 1
        self._last_salvage = Salvage(
            time.time(),
            True,
            str(aside),
            str(exc),
            len(copied.kept),
            copied.samples,
            None,
            tuple(ranges),
        )
        log.error(
            "buffer.corrupt.moved_aside",
            path=str(self._path),
            moved_to=str(aside),
            at_start=True,
            file_bytes=size,
            error=str(exc),
            recovered_records=len(copied.kept),
            recovered_samples=copied.samples,
            lost_seq_ranges=ranges if ranges != ["unknown"] else "unknown",
            salvaged_last_seq=high or None,
            detail=(
                "intact records were copied into a new file and will be delivered; "
                "lost seq ranges are reported to consumers as gaps (reason corrupt)"
                + (f"; {note}" if note else "")
            ),
        )

    def _recover_damage(self, exc: BaseException) -> bool:
        """The live file is damaged (see "A file damaged at run time"): copy what reads
        back whole into a new file, move the damaged one aside, carry on with the new
        one. False when that could not be done: the buffer is then degraded (new records
        in memory) and the salvage is tried again at every probe."""
        old = self._require_con()
        tmp = Path(f"{self._path}.salvage")
        tmp_files = [tmp, *(Path(f"{tmp}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]
        _unlink(tmp_files)
        spill_samples = sum(r.count for r in self._spill.values())
        disk_records = self._records - len(self._spill)
        disk_samples = self._samples - spill_samples
        floor = self._oldest_first_seq or 1
        # Seqs above the disk's newest record are in memory (degraded) or were refused.
        spill_first = next(iter(self._spill.values())).first_seq if self._spill else None
        high = spill_first - 1 if spill_first is not None else self._last_seq
        lost: list[tuple[int, int]] = []
        gaps_before = (list(self._gaps.gaps), self._gaps.forgotten)
        try:
            new = self._connect(tmp)
        except (sqlite3.Error, RuntimeError, OSError) as err:
            return self._salvage_failed(exc, err, tmp_files)
        try:
            new.execute("BEGIN IMMEDIATE")
            copied = copy_intact(old, new, self._cols, _INSERT_RECORD, skip=self._pending_deletes)
            lost = lost_ranges(copied, high, floor=floor)
            for first, last in lost:
                self._gaps.add(Gap(first, last, last - first + 1, "corrupt", self._epoch))
            self._rewrite_gaps(new)
            new.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (self._last_seq,))
            cur = new.execute(
                "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'records'",
                (self._id_hw,),
            )
            if cur.rowcount == 0 and self._id_hw:
                new.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (self._id_hw,)
                )
            self._write_info(new)
            new.execute("COMMIT")
            new.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except (sqlite3.Error, OSError) as err:
            self._gaps.gaps, self._gaps.forgotten = gaps_before
            with contextlib.suppress(sqlite3.Error):
                if new.in_transaction:
                    new.execute("ROLLBACK")
            return self._salvage_failed(exc, err, tmp_files, new)
        new.close()
        # Closing checkpoints whatever the damaged WAL still maps into the damaged file:
        # that copy is kept for inspection only, everything readable is in `tmp` now.
        with contextlib.suppress(sqlite3.Error):
            old.close()
        self._con = None
        try:
            aside, size = self._move_aside("damaged")
            os.replace(tmp, self._path)
            _fsync_dir(self._path.parent)
            self._use(self._connect())
        except (sqlite3.Error, RuntimeError, OSError) as err:
            # No file to work on: memory until a probe manages to open one.
            self._use(_empty_stand_in())
            self._open_pending = True
            return self._salvage_failed(exc, err, tmp_files)
        lost_records = max(0, disk_records - len(copied.kept))
        lost_samples = max(0, disk_samples - copied.samples)
        self._pending_deletes.clear()  # they were not copied
        self._gaps_dirty = False
        spill = list(self._spill.values())
        self._records = self._samples = self._bytes = 0
        self._load_state()
        self._records += len(spill)
        self._samples += spill_samples
        self._bytes += self._spill_bytes
        if spill:
            self._max_id = spill[-1].id
        self._count_drop("corrupt", lost_records, lost_samples)
        self._damaged = None
        self._read_failed_at = None
        self._damaged_files += 1
        ranges = tuple(seq_ranges(lost))
        self._last_salvage = Salvage(
            time.time(),
            False,
            str(aside),
            str(exc),
            len(copied.kept),
            copied.samples,
            lost_samples,
            ranges,
        )
        log.error(
            "buffer.corrupt.moved_aside",
            path=str(self._path),
            moved_to=str(aside),
            at_start=False,
            file_bytes=size,
            error=str(exc),
            recovered_records=len(copied.kept),
            recovered_samples=copied.samples,
            lost_records=lost_records,
            lost_samples=lost_samples,
            lost_seq_ranges=list(ranges),
            epoch=self._epoch,
            detail=(
                "the buffer file was damaged while running: intact records were copied "
                "into a new file and will be delivered; lost seq ranges are reported to "
                "consumers as gaps (reason corrupt); seqs and the epoch continue"
            ),
        )
        self._publish()
        self._wake()
        return True

    def _salvage_failed(
        self,
        exc: BaseException,
        err: BaseException,
        tmp_files: list[Path],
        new: sqlite3.Connection | None = None,
    ) -> bool:
        if new is not None:
            with contextlib.suppress(sqlite3.Error):
                new.close()
        _unlink(tmp_files)
        first = self._damaged is None
        self._damaged = exc
        if first:
            log.error(
                "buffer.corrupt.salvage_failed",
                path=str(self._path),
                error=str(exc),
                salvage_error=str(err),
                detail=(
                    "the buffer file is damaged and could not be copied yet; new samples "
                    f"are kept in memory; retried every {PROBE_INTERVAL_S:g} s"
                ),
            )
        if self._degraded is None:
            self._enter_degraded(exc, reason="corrupt", quiet=True)
        return False

    def _load_state(self) -> None:
        con = self._require_con()
        meta_seq = int(con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
        records, samples, data_bytes, max_id, max_seq = con.execute(
            "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(length(data)), 0), "
            "coalesce(max(id), 0), coalesce(max(last_seq), 0) FROM records"
        ).fetchone()
        id_seq = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        gaps = [
            Gap(int(a), int(b), int(c), str(d), self._row_epoch(e))
            for a, b, c, d, e in con.execute(
                f"SELECT first_seq, last_seq, count, reason, {self._epoch_col} FROM gaps "
                "ORDER BY id"
            )
        ]
        gap_seq = max((g.last_seq for g in gaps), default=0)
        self._last_seq = max(self._last_seq, meta_seq, int(max_seq), gap_seq)
        self._records = int(records)
        self._samples = int(samples)
        self._bytes = int(data_bytes) + self._records * record_size(0)
        self._max_id = int(max_id)
        # Never below ids already given out (records held in memory while degraded).
        self._id_hw = max(self._id_hw, self._max_id, int(id_seq[0]) if id_seq else 0)
        self._load_dicts(con)
        forgotten = self._gaps.forgotten
        self._gaps = GapList(gaps)
        self._gaps.forgotten = forgotten
        self._refresh_oldest()
        self._publish()

    def _load_dicts(self, con: sqlite3.Connection) -> None:
        """The tag dictionaries in the file; a damaged one is left out (the records that
        refer to it fail their check at take and are set aside as corrupt)."""
        rows: list[Any] = try_(lambda: con.execute("SELECT id, data FROM dicts").fetchall(), [])
        self._dict_ids = {}
        self._dicts = {}
        for did, blob in rows:
            try:
                d = check_dictionary(bytes(blob))
            except CorruptRecord as exc:
                log.error(
                    "buffer.dictionary.corrupt", path=str(self._path), dict_id=did, error=str(exc)
                )
                continue
            self._dicts[int(did)] = d
            self._dict_ids[d.blob] = int(did)

    def _dict_id(self, con: sqlite3.Connection, blob: bytes) -> int:
        """The id of a tag dictionary in the file, inserted if new (inside the caller's
        transaction; the caller notes it with `_note_dict` once that committed)."""
        if not blob:
            return 0
        did = self._dict_ids.get(blob)
        if did is not None:
            return did
        con.execute("INSERT OR IGNORE INTO dicts (data) VALUES (?)", (blob,))
        return int(con.execute("SELECT id FROM dicts WHERE data = ?", (blob,)).fetchone()[0])

    def _note_dict(self, did: int, blob: bytes) -> None:
        if did and did not in self._dicts:
            d = check_dictionary(blob)
            self._dicts[did] = d
            self._dict_ids[d.blob] = did

    # ------------------------------------------------------------------ epoch and lease

    def _settle_epoch(self, state: tuple[int, str | None] | None, writable: bool = True) -> None:
        """Choose the epoch at open and make the lease durable (see "Epoch and seq
        leases"). `state`: what `<path>.seq` holds."""
        con = self._require_con()
        db_epoch = try_(lambda: _info(con, "epoch"), None)
        legacy = try_(lambda: _info(con, "legacy_epoch"), None)
        db_high = self._last_seq
        lease, seq_epoch = state if state is not None else (0, None)
        skipped: Gap | None = None
        if db_epoch is not None and seq_epoch == db_epoch:
            self._epoch = db_epoch
            if lease > db_high:
                # Leased before an unclean stop: maybe used (a power cut can roll back
                # the records that had them), so never handed out again.
                skipped = Gap(db_high + 1, lease, lease - db_high, "skipped", db_epoch)
                self._gaps.add(skipped)
        else:
            self._epoch = new_epoch()
            if db_epoch is None and state is None:
                why = ""  # a new buffer: nothing to report
            elif db_epoch is None and seq_epoch is None:
                why = "first start of a buffer made before epochs existed"
            elif db_epoch is None:
                why = "the buffer file is new or was replaced; <path>.seq is from another one"
            elif state is None:
                why = "<path>.seq is missing or unreadable: the seq lease is unknown"
            else:
                why = "<path>.seq belongs to another buffer file (replaced or restored?)"
            if why:
                log.warning(
                    "buffer.epoch.new",
                    path=str(self._path),
                    epoch=self._epoch,
                    previous=db_epoch,
                    reason=why,
                    continues_after_seq=max(db_high, lease),
                )
        self._legacy_epoch = legacy or db_epoch or self._epoch
        # Gaps were loaded before the epoch was known: those of a format-1 file have none.
        self._gaps.gaps = [
            g if g.epoch else replace(g, epoch=self._legacy_epoch) for g in self._gaps.gaps
        ]
        self._last_seq = max(db_high, lease)
        self._lease_end = self._last_seq
        self._write_lease(self._lease_end)
        if not writable:
            self._gaps_dirty = skipped is not None  # written when the file opens
            self._publish()
            return
        try:
            con.execute("BEGIN IMMEDIATE")
            if skipped is not None:
                self._rewrite_gaps(con)
            con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (self._last_seq,))
            self._write_info(con)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            if con.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            if not is_disk_error(exc):
                raise
            # The gaps and epoch are written with the next successful transaction.
            self._gaps_dirty = True
            self._enter_degraded(exc)
        self._publish()

    def _write_info(self, con: sqlite3.Connection) -> None:
        con.executemany(
            "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
            (("epoch", self._epoch), ("legacy_epoch", self._legacy_epoch)),
        )

    def _rewrite_gaps(self, con: sqlite3.Connection) -> None:
        con.execute("DELETE FROM gaps")
        con.executemany(
            _INSERT_GAP,
            (
                (g.first_seq, g.last_seq, g.count, g.reason, time.time(), g.epoch)
                for g in self._gaps.gaps
            ),
        )

    def _ensure_lease(self, last: int) -> None:
        """Make sure seqs up to `last` are covered by a durable lease before a record
        holding them can commit (and so, before it can leave the agent)."""
        if last <= self._lease_end:
            return
        end = last + max(LEASE_BLOCK, 1)
        if self._write_lease(end):
            self._lease_end = end
            self._leases += 1
            if not self._lease_ok:
                self._lease_ok = True
                log.info("buffer.lease.recovered", path=str(self._seq_path), leased_seq=end)
        elif self._lease_ok:
            self._lease_ok = False
            log.error(
                "buffer.lease.failed",
                path=str(self._seq_path),
                leased_seq=self._lease_end,
                last_seq=last,
                detail=(
                    "the seq lease cannot be made durable (the disk fails); samples are "
                    "still stored, but after a power cut in this state seqs above "
                    f"{self._lease_end} could be handed out again in epoch {self._epoch}"
                ),
            )
        self._publish()

    def _write_lease(self, end: int) -> bool:
        """Write "<end> <epoch>" in place into `<path>.seq` and flush it to the disk
        (creating it, and flushing its directory, the first time). False on failure."""
        try:
            if self._seq_fd is None:
                created = not self._seq_path.exists()
                self._seq_fd = os.open(self._seq_path, os.O_RDWR | os.O_CREAT, 0o644)
                if created:
                    _fsync_dir(self._seq_path.parent)
            text = f"{end} {self._epoch}".encode()
            os.pwrite(self._seq_fd, text.ljust(_SEQ_FILE_BYTES - 1) + b"\n", 0)
            _fdatasync(self._seq_fd)
        except OSError:
            return False  # the caller reports it, once
        return True

    def _use(self, con: sqlite3.Connection) -> None:
        """Make `con` the connection (a v1 read-only stand-in has no epoch columns)."""
        self._con = con
        self._epoch_col = "epoch" if try_(lambda: _has_epoch(con), True) else "''"
        dict_col = "dict" if try_(lambda: _has_column(con, "dict"), True) else "0"
        self._cols = _record_cols(self._epoch_col, dict_col)

    def _row_epoch(self, value: object) -> str:
        return str(value) if value else self._legacy_epoch or self._epoch

    def _record(self, row: Any) -> Record:
        """The record of a row, its data self-contained (see "On-disk format"); raises
        CorruptRecord when the row fails its checks."""
        rid, device, first, last, count, created, data, epoch, did = row
        if is_body(data):
            head = check_body(data)
            if (head.first_seq, head.last_seq, head.count) != (first, last, count):
                raise CorruptRecord("record: its header does not match its row")
            if not head.json:
                d = self._dicts.get(did)
                if d is None:
                    raise CorruptRecord(f"record: its dictionary {did} is missing or damaged")
                if d.crc != head.dict_crc:
                    raise CorruptRecord("record: refers to another dictionary")
                data = d.blob + data
        return Record(rid, device, first, last, count, created, data, epoch or self._legacy_epoch)

    def _count_drop(self, reason: str, records: int, samples: int) -> None:
        self._dropped_samples += samples
        self._dropped_records += records
        self._dropped_by[reason] = self._dropped_by.get(reason, 0) + samples

    def _require_con(self) -> sqlite3.Connection:
        if self._con is None:
            raise RuntimeError("buffer is not open")
        return self._con

    def _refresh_oldest(self) -> None:
        row = None
        with contextlib.suppress(sqlite3.Error):
            row = (
                self._require_con()
                .execute("SELECT created, first_seq FROM records ORDER BY id LIMIT 1")
                .fetchone()
            )
        if row is not None:
            self._oldest_created = float(row[0])
            self._oldest_first_seq = int(row[1])
        elif self._spill:
            oldest = next(iter(self._spill.values()))
            self._oldest_created = oldest.created
            self._oldest_first_seq = oldest.first_seq
        else:
            self._oldest_created = None
            self._oldest_first_seq = None

    # ------------------------------------------------------------------ append

    def _append_sync(self, device: str, samples: Sequence[WireSample]) -> None:
        batch = self._encoder.encode(samples, self._last_seq)
        now = time.time()
        self._ensure_lease(batch.last_seq)
        if self._degraded is not None and time.monotonic() >= self._next_probe:
            self._try_recover()
        if self._degraded is None:
            for attempt in (1, 2):
                try:
                    self._append_disk(device, batch, now)
                    return
                except sqlite3.Error as exc:
                    if attempt == 1 and _is_corruption(exc) and self._recover_damage(exc):
                        continue  # once more, on the salvaged file
                    if not (is_disk_error(exc) or _is_corruption(exc)):
                        raise
                    if self._degraded is None:
                        self._enter_degraded(exc)
                    break
        self._append_memory(device, batch, now)

    def _append_many_sync(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]:
        errors: list[Exception | None] = []
        for device, samples in batches:
            try:
                if samples:
                    self._append_sync(device, samples)
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _append_disk(self, device: str, batch: EncodedBatch, now: float) -> None:
        con = self._require_con()
        size = record_size(len(batch.data))
        limit = self._config.max_bytes
        refused: DropReason | None = None
        if size > limit:
            refused = "too_large"
        elif self._bytes + size > limit and self._config.when_full == "drop_newest":
            refused = "drop_newest"
        expired: list[_Row] = []
        evicted: list[_Row] = []
        new_id = 0
        did = 0
        gaps_before = (list(self._gaps.gaps), self._gaps.forgotten)
        try:
            con.execute("BEGIN IMMEDIATE")
            expired = self._expire(con, now)
            expired_bytes = sum(record_size(e[4]) for e in expired)
            if refused is not None:
                self._add_gap(
                    con, Gap(batch.first_seq, batch.last_seq, batch.count, refused, self._epoch)
                )
            else:
                if self._bytes - expired_bytes + size > limit:
                    evicted = self._evict(
                        con, self._bytes - expired_bytes + size - limit, "drop_oldest"
                    )
                did = self._dict_id(con, batch.dictionary)
                cur = con.execute(
                    "INSERT INTO records (device, first_seq, last_seq, count, created, data, "
                    "epoch, dict) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        device,
                        batch.first_seq,
                        batch.last_seq,
                        batch.count,
                        now,
                        batch.data,
                        self._epoch,
                        did,
                    ),
                )
                new_id = int(cur.lastrowid or 0)
            con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (batch.last_seq,))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            self._gaps.gaps, self._gaps.forgotten = gaps_before
            raise
        self._last_seq = batch.last_seq
        self._note_dict(did, batch.dictionary)
        if expired:
            self._forget(expired, "max_age")
        if refused is not None:
            self._count_drop(refused, 1, batch.count)
            self._episode.dropped(refused, 1, batch.count, self._bytes)
            if expired:
                self._refresh_oldest()
            self._publish()
            return
        if evicted:
            self._forget(evicted, "drop_oldest")
        self._records += 1
        self._samples += batch.count
        self._bytes += size
        self._appended += batch.count
        self._max_id = new_id
        self._id_hw = max(self._id_hw, new_id)
        if evicted or expired or self._oldest_created is None:
            self._refresh_oldest()
        if not evicted:
            self._episode.fitted(self._bytes)
        self._publish()
        self._wake()

    def _forget(self, rows: list[_Row], reason: str) -> None:
        """Account for records deleted by a drop rule (after its transaction committed)."""
        samples = sum(e[3] for e in rows)
        self._records -= len(rows)
        self._samples -= samples
        self._bytes -= sum(record_size(e[4]) for e in rows)
        self._count_drop(reason, len(rows), samples)
        episode = self._age_episode if reason == "max_age" else self._episode
        episode.dropped(reason, len(rows), samples, self._bytes)

    def _expire(self, con: sqlite3.Connection, now: float) -> list[_Row]:
        """Delete the records older than max_age_s (inside the caller's transaction)."""
        max_age = self._config.max_age_s
        oldest = self._oldest_created
        if max_age is None or oldest is None or oldest >= now - max_age:
            return []
        rows = [
            (int(a), int(b), int(c), int(d), int(e), self._row_epoch(f))
            for a, b, c, d, e, f in con.execute(
                "DELETE FROM records WHERE created < ? "
                "RETURNING id, first_seq, last_seq, count, length(data), epoch",
                (now - max_age,),
            ).fetchall()
        ]
        rows.sort()
        for _, first, last, count, _, epoch in rows:
            self._add_gap(con, Gap(first, last, count, "max_age", epoch))
        return rows

    def _evict(self, con: sqlite3.Connection, need: int, reason: str) -> list[_Row]:
        """Delete the oldest records until `need` bytes are freed (inside the caller's
        transaction); returns (id, first_seq, last_seq, count, data length) of each."""
        evicted: list[_Row] = []
        freed = 0
        after = 0
        while freed < need:
            rows = con.execute(
                "SELECT id, first_seq, last_seq, count, length(data), epoch FROM records "
                "WHERE id > ? ORDER BY id LIMIT 256",
                (after,),
            ).fetchall()
            if not rows:
                break  # the accounting says there is more; the table disagrees: stop
            for row in rows:
                rid, first, last, count, length = (int(v) for v in row[:5])
                evicted.append((rid, first, last, count, length, self._row_epoch(row[5])))
                freed += record_size(length)
                after = rid
                if freed >= need:
                    break
        if evicted:
            con.execute("DELETE FROM records WHERE id <= ?", (evicted[-1][0],))
            for _, first, last, count, _, epoch in evicted:
                self._add_gap(con, Gap(first, last, count, reason, epoch))
        return evicted

    def _add_gap(self, con: sqlite3.Connection | None, gap: Gap) -> None:
        """Record a gap in memory and, given a connection, in the gaps table."""
        merged, forgotten = self._gaps.add(gap)
        if con is None:
            self._gaps_dirty = True
            return
        if merged:
            last = self._gaps.gaps[-1]
            con.execute(
                "UPDATE gaps SET last_seq = ?, count = ? WHERE id = (SELECT max(id) FROM gaps)",
                (last.last_seq, last.count),
            )
        else:
            con.execute(
                _INSERT_GAP,
                (gap.first_seq, gap.last_seq, gap.count, gap.reason, time.time(), gap.epoch),
            )
        if forgotten:
            con.execute(
                "DELETE FROM gaps WHERE id IN (SELECT id FROM gaps ORDER BY id LIMIT ?)",
                (forgotten,),
            )

    def _clear_gaps_sync(self, through_seq: int) -> None:
        self._gaps.clear(through_seq)
        if self._degraded is not None:
            self._gaps_dirty = True
            return
        con = self._require_con()
        try:
            con.execute("DELETE FROM gaps WHERE last_seq <= ?", (through_seq,))
        except sqlite3.Error as exc:
            if _is_corruption(exc) and self._recover_damage(exc):
                return  # the salvaged file has the gaps as they are in memory
            if not (is_disk_error(exc) or _is_corruption(exc)):
                raise
            self._gaps_dirty = True

    def _reads_keep_failing(self) -> bool:
        """A read failed with an I/O error: True once reads have failed for a whole
        probe interval (a bad sector, not a passing hiccup): then it is damage."""
        now = time.monotonic()
        if self._read_failed_at is None:
            self._read_failed_at = now
        return now - self._read_failed_at >= PROBE_INTERVAL_S

    # ------------------------------------------------------------------ disk trouble

    def _enter_degraded(
        self,
        exc: BaseException,
        at_start: bool = False,
        reason: str | None = None,
        quiet: bool = False,
    ) -> None:
        if reason is None:
            reason = getattr(exc, "sqlite_errorname", None)
        if reason is None and isinstance(exc, OSError) and exc.errno is not None:
            reason = errno.errorcode.get(exc.errno)
        self._degraded = reason or type(exc).__name__
        self._degraded_since = time.monotonic()
        self._next_probe = self._degraded_since + PROBE_INTERVAL_S
        if quiet:  # the caller logged it
            self._publish()
            return
        detail = (
            "new samples are kept in memory (oldest dropped first when it is full) "
            "until the disk works again; a crash meanwhile loses them"
        )
        if at_start:
            detail = (
                "the buffer file cannot be opened for writing at start; the agent runs "
                "and keeps the newest samples in memory (oldest dropped first when it is "
                "full), records already on disk stay there and are delivered first; the "
                f"disk is tried again every {PROBE_INTERVAL_S:g} s; a crash meanwhile "
                "loses the samples in memory"
            )
        log.error(
            "buffer.disk.failed",
            path=str(self._path),
            reason=self._degraded,
            error=str(exc),
            at_start=at_start,
            last_seq=self._last_seq,
            memory_fallback_bytes=self._config.memory_fallback_bytes,
            detail=detail,
        )
        self._publish()

    def _append_memory(self, device: str, batch: EncodedBatch, now: float) -> None:
        # Held self-contained (dictionary + body) and counted so; moved to the file as
        # body and dictionary (see _try_recover).
        data = batch.full
        size = record_size(len(data))
        limit = self._config.memory_fallback_bytes
        self._last_seq = batch.last_seq
        if size > limit:
            self._add_gap(
                None, Gap(batch.first_seq, batch.last_seq, batch.count, "too_large", self._epoch)
            )
            self._count_drop("too_large", 1, batch.count)
            self._episode.dropped("too_large", 1, batch.count, self._bytes)
            self._publish()
            return
        max_age = self._config.max_age_s
        dropped: list[tuple[Record, str]] = []
        while self._spill:
            oldest = next(iter(self._spill.values()))
            if self._spill_bytes + size > limit:
                dropped.append((oldest, "memory_full"))
            elif max_age is not None and oldest.created < now - max_age:
                dropped.append((oldest, "max_age"))
            else:
                break
            del self._spill[oldest.id]
            self._spill_bytes -= record_size(len(oldest.data))
        for rec, reason in dropped:
            self._add_gap(None, Gap(rec.first_seq, rec.last_seq, rec.count, reason, rec.epoch))
            self._forget(
                [(rec.id, rec.first_seq, rec.last_seq, rec.count, len(rec.data), rec.epoch)],
                reason,
            )
        self._id_hw += 1
        rid = self._id_hw
        self._spill[rid] = Record(
            rid, device, batch.first_seq, batch.last_seq, batch.count, now, data, self._epoch
        )
        self._spill_bytes += size
        self._records += 1
        self._samples += batch.count
        self._bytes += size
        self._appended += batch.count
        self._max_id = rid
        if dropped or self._oldest_created is None:
            self._refresh_oldest()
        self._publish()
        self._wake()

    def _try_recover(self) -> None:
        """Move the memory records, pending deletions and gaps to the file in one
        transaction; on success the buffer is healthy again."""
        self._next_probe = time.monotonic() + PROBE_INTERVAL_S
        at_start = self._open_pending
        if at_start and not self._finish_open():
            return
        if self._damaged is not None and not self._recover_damage(self._damaged):
            return
        con = self._require_con()
        gaps_before = (list(self._gaps.gaps), self._gaps.forgotten)
        moved = len(self._spill)
        try:
            con.execute("BEGIN IMMEDIATE")
            if self._pending_deletes:
                con.execute(
                    "DELETE FROM records WHERE id IN (SELECT value FROM json_each(?))",
                    (orjson.dumps(sorted(self._pending_deletes)),),
                )
            rows: list[tuple[Any, ...]] = []
            for r in self._spill.values():
                blob, body = split_record(r.data)
                did = self._dict_id(con, blob)
                self._dict_ids.setdefault(blob, did)  # reloaded from the file below
                rows.append(
                    (
                        r.id,
                        r.device,
                        r.first_seq,
                        r.last_seq,
                        r.count,
                        r.created,
                        body,
                        r.epoch,
                        did,
                    )
                )
            con.executemany(_INSERT_RECORD, rows)
            used = int(
                con.execute(
                    "SELECT coalesce(sum(length(data)), 0) + count(*) * ? FROM records",
                    (record_size(0),),
                ).fetchone()[0]
            )
            evicted: list[_Row] = []
            if used > self._config.max_bytes:
                # The memory records were accepted already: make room by the oldest.
                evicted = self._evict(con, used - self._config.max_bytes, "drop_oldest")
            if self._gaps_dirty or evicted:
                self._rewrite_gaps(con)
            con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (self._last_seq,))
            self._write_info(con)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            if con.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            self._gaps.gaps, self._gaps.forgotten = gaps_before
            self._load_dicts(con)  # the ids noted above were rolled back
            if not is_disk_error(exc):
                raise
            return
        if evicted:
            samples = sum(e[3] for e in evicted)
            self._count_drop("drop_oldest", len(evicted), samples)
            self._episode.dropped("drop_oldest", len(evicted), samples, used)
        duration = time.monotonic() - self._degraded_since
        self._degraded = None
        self._spill.clear()
        self._spill_bytes = 0
        self._pending_deletes.clear()
        self._gaps_dirty = False
        self._load_state()
        log.info(
            "buffer.disk.recovered",
            path=str(self._path),
            moved_records=moved,
            degraded_s=round(duration, 3),
            since_start=at_start,
            bytes=self._bytes,
        )
        self._wake()

    # ------------------------------------------------------------------ take / commit

    def _read_records(self, max_records: int, after_id: int) -> list[Any]:
        return (
            self._require_con()
            .execute(
                f"SELECT {self._cols} FROM records WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max_records + len(self._pending_deletes)),
            )
            .fetchall()
        )

    def _take_sync(self, max_records: int, after_id: int) -> list[Record]:
        out: list[Record] = []
        try:
            rows = self._read_records(max_records, after_id)
            self._read_failed_at = None
        except sqlite3.Error as exc:
            rows = []
            damaged = _is_corruption(exc) or (
                is_disk_error(exc) and self._degraded is None and self._reads_keep_failing()
            )
            if damaged and self._degraded is None and self._recover_damage(exc):
                with contextlib.suppress(sqlite3.Error):
                    rows = self._read_records(max_records, after_id)
            elif not (is_disk_error(exc) or _is_corruption(exc)):
                raise
            elif self._degraded is None:
                # A disk that cannot even be read: deliver what memory holds meanwhile.
                self._enter_degraded(exc)
        pending = self._pending_deletes
        bad: list[tuple[Any, str]] = []
        for row in rows:
            if row[0] in pending or row[0] in self._set_aside_failed:
                continue
            try:
                out.append(self._record(row))
            except CorruptRecord as exc:
                bad.append((row, str(exc)))
        if bad:
            self._set_aside(bad)
        out = out[:max_records]
        if len(out) < max_records and self._spill:
            for rid, rec in self._spill.items():
                if rid > after_id:
                    out.append(rec)
                    if len(out) >= max_records:
                        break
        return out

    def _set_aside(self, bad: list[tuple[Any, str]]) -> None:
        """Records that fail their checks at take: moved to ``set_aside`` (the newest
        SET_ASIDE_KEEP kept for inspection) and reported as gaps with reason ``corrupt``,
        never published. When the disk refuses that, they are only hidden from take."""
        con = self._require_con()
        gaps_before = (list(self._gaps.gaps), self._gaps.forgotten)
        deleted: list[tuple[Any, str, int, int]] = []
        try:
            con.execute("BEGIN IMMEDIATE")
            for row, error in bad:
                rid, device, first, last, count, created, data, epoch, did = row
                con.execute(
                    "INSERT INTO set_aside (record_id, device, first_seq, last_seq, count, "
                    "created, data, epoch, dict, error, at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        rid,
                        device,
                        first,
                        last,
                        count,
                        created,
                        data,
                        epoch,
                        did,
                        error,
                        time.time(),
                    ),
                )
                gone = con.execute(
                    "DELETE FROM records WHERE id = ? RETURNING count, length(data)", (rid,)
                ).fetchone()
                if gone is None:
                    continue
                lo, hi = sorted((int(first), int(last)))
                self._add_gap(con, Gap(lo, hi, int(count), "corrupt", self._row_epoch(epoch)))
                deleted.append((row, error, int(gone[0]), int(gone[1])))
            con.execute(
                "DELETE FROM set_aside WHERE id NOT IN "
                "(SELECT id FROM set_aside ORDER BY id DESC LIMIT ?)",
                (SET_ASIDE_KEEP,),
            )
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            if con.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            self._gaps.gaps, self._gaps.forgotten = gaps_before
            for row, error in bad:
                if row[0] not in self._set_aside_failed:
                    self._set_aside_failed.add(row[0])
                    log.error(
                        "buffer.record.corrupt",
                        path=str(self._path),
                        record_id=row[0],
                        device=row[1],
                        first_seq=row[2],
                        last_seq=row[3],
                        error=error,
                        set_aside=False,
                        detail=f"hidden from delivery; the disk refused to move it: {exc}",
                    )
            return
        for row, error, count, length in deleted:
            self._records -= 1
            self._samples -= count
            self._bytes -= record_size(length)
            self._count_drop("corrupt", 1, count)
            log.error(
                "buffer.record.corrupt",
                path=str(self._path),
                record_id=row[0],
                device=row[1],
                first_seq=row[2],
                last_seq=row[3],
                samples=count,
                error=error,
                set_aside=True,
                detail=(
                    "the record fails its checksum or layout checks: it is not published; "
                    "its seq range is reported to consumers as a gap (reason corrupt); "
                    "the damaged row is kept in the set_aside table"
                ),
            )
        self._refresh_max_id()
        self._refresh_oldest()
        self._publish()

    def _commit_sync(self, ids: list[int]) -> None:
        con = self._require_con()
        spilled = [self._spill.pop(i) for i in ids if i in self._spill]
        spilled_ids = {r.id for r in spilled}
        # Pending ones were counted as delivered already; recovery deletes them.
        disk_ids = [i for i in ids if i not in spilled_ids and i not in self._pending_deletes]
        for rec in spilled:
            size = record_size(len(rec.data))
            self._spill_bytes -= size
            self._records -= 1
            self._samples -= rec.count
            self._bytes -= size
            self._committed += rec.count
        rows: list[Any] = []
        for attempt in (1, 2) if disk_ids else ():
            con = self._require_con()
            try:
                con.execute("BEGIN IMMEDIATE")
                rows = con.execute(
                    "DELETE FROM records WHERE id IN (SELECT value FROM json_each(?)) "
                    "RETURNING count, length(data)",
                    (orjson.dumps(disk_ids),),
                ).fetchall()
                con.execute("COMMIT")
                break
            except sqlite3.Error as exc:
                if con.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                rows = []
                if (
                    attempt == 1
                    and _is_corruption(exc)
                    and self._degraded is None
                    and self._recover_damage(exc)
                ):
                    continue  # the salvaged file kept the ids: delete there
                if not (is_disk_error(exc) or _is_corruption(exc)):
                    raise
                if self._degraded is None:
                    self._enter_degraded(exc)
                rows = self._hide_delivered(disk_ids)
                break
        if rows or spilled:
            samples = sum(int(r[0]) for r in rows)
            self._records -= len(rows)
            self._samples -= samples
            self._bytes -= sum(record_size(int(r[1])) for r in rows)
            self._committed += samples
            self._age_episode.fitted(self._bytes)
            if self._records == 0:
                self._max_id = 0
                self._oldest_created = None
            else:
                self._refresh_max_id()
                self._refresh_oldest()
            self._publish()
        if self._degraded is not None:
            if time.monotonic() >= self._next_probe:
                self._try_recover()
        elif rows:
            self._maintain(drained=self._records == 0)

    def _hide_delivered(self, ids: list[int]) -> list[Any]:
        """The disk refused a deletion: hide the records from take() until it works;
        returns (count, length) of each, as far as the file can still be read."""
        self._pending_deletes.update(ids)
        try:
            return (
                self._require_con()
                .execute(
                    "SELECT count, length(data) FROM records WHERE id IN "
                    "(SELECT value FROM json_each(?))",
                    (orjson.dumps(ids),),
                )
                .fetchall()
            )
        except sqlite3.Error:
            return []  # the figures are recounted from the file on recovery

    def _refresh_max_id(self) -> None:
        if self._spill:
            self._max_id = next(reversed(self._spill))
            return
        # On failure _max_id keeps its value: wait() may wake once more than needed.
        with contextlib.suppress(sqlite3.Error):
            self._max_id = int(
                self._require_con()
                .execute("SELECT coalesce(max(id), 0) FROM records")
                .fetchone()[0]
            )

    def _maintain(self, drained: bool) -> None:
        """Give free pages back to the file system (see the margin note above). Failures
        here cost disk space, not data: log and carry on."""
        con = self._require_con()
        self._commits_since_check += 1
        try:
            # execute() steps a pragma that returns no rows only once, and each step of
            # incremental_vacuum frees one page; executescript() runs it to completion.
            now = time.monotonic()
            if drained and (
                now - self._last_drained_maintenance >= _DRAINED_MAINTENANCE_EVERY_S
                or self._free_bytes(con) > _VACUUM_MIN_BYTES
            ):
                # Dictionaries no waiting record refers to (a device whose tags changed).
                con.execute("DELETE FROM dicts WHERE id NOT IN (SELECT dict FROM records)")
                self._load_dicts(con)
                if not self._page_size_ok:
                    self._repage(con)
                con.executescript("PRAGMA incremental_vacuum;")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                self._commits_since_check = 0
                self._last_drained_maintenance = now
            elif self._commits_since_check >= _VACUUM_CHECK_EVERY:
                self._commits_since_check = 0
                if self._free_bytes(con) > max(_VACUUM_MIN_BYTES, self._bytes // 4):
                    con.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            if _is_corruption(exc):
                self._recover_damage(exc)
                return
            log.warning("buffer.vacuum.failed", path=str(self._path), error=str(exc))

    def _repage(self, con: sqlite3.Connection) -> None:
        """A file made before format 3 has 4 KiB pages: rebuild it with PAGE_SIZE the first
        time it drains (a VACUUM of the few pages left; see "On-disk format"). The journal
        is switched to DELETE for it, as SQLite requires, and back to WAL."""
        self._page_size_ok = True  # tried once per open, whatever happens
        old = int(con.execute("PRAGMA page_size").fetchone()[0])
        if old == PAGE_SIZE:
            return
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        con.execute("PRAGMA journal_mode=DELETE").fetchall()
        try:
            con.execute(f"PRAGMA page_size={PAGE_SIZE}")
            con.execute("VACUUM")
        finally:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        new = int(con.execute("PRAGMA page_size").fetchone()[0])
        log.info(
            "buffer.page_size.changed",
            path=str(self._path),
            old_page_size=old,
            page_size=new,
            journal_mode=str(mode),
        )

    @staticmethod
    def _free_bytes(con: sqlite3.Connection) -> int:
        free = int(con.execute("PRAGMA freelist_count").fetchone()[0])
        page = int(con.execute("PRAGMA page_size").fetchone()[0])
        return free * page

    def _close_sync(self) -> None:
        con = self._con
        if con is None:
            return
        if self._degraded is not None:
            self._try_recover()
            con = self._require_con()
            if self._degraded is not None and self._spill:
                log.error(
                    "buffer.disk.lost_on_close",
                    path=str(self._path),
                    records=len(self._spill),
                    samples=sum(r.count for r in self._spill.values()),
                    detail="the disk still fails; the records held in memory are lost",
                )
        if not self._open_pending:
            try:
                busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                # Everything is on the disk: give the unused rest of the lease back, so
                # that a clean restart continues without a gap.
                if not busy and self._degraded is None and self._damaged is None:
                    self._write_lease(self._last_seq)
            except sqlite3.Error as exc:
                log.warning("buffer.close.checkpoint_failed", path=str(self._path), error=str(exc))
        self._close_connection()

    def _close_connection(self, keep_seq_fd: bool = False) -> None:
        con, self._con = self._con, None
        if con is not None:
            con.close()
        made, self._stand_in_made = self._stand_in_made, []
        _unlink(made)
        if keep_seq_fd:
            return
        fd, self._seq_fd = self._seq_fd, None
        if fd is not None:
            os.close(fd)

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
            degraded=self._degraded is not None,
            degraded_reason=self._degraded,
            memory_records=len(self._spill),
            memory_bytes=self._spill_bytes,
            memory_fallback=self._degraded is not None,
            epoch=self._epoch,
            leased_seq=self._lease_end,
            lease_ok=self._lease_ok,
            damaged_files=self._damaged_files,
            last_salvage=self._last_salvage,
            dropped_by_reason=dict(self._dropped_by),
        )

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._notifier.notify)


#: OSError numbers of a full, read-only or failing disk (directory creation at open).
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT})


def _size(path: Path) -> int:
    """Size of `path`, 0 when it does not exist, -1 when it cannot be examined."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError:
        return -1


def _unlink(paths: Sequence[Path]) -> None:
    for side in paths:
        with contextlib.suppress(OSError):
            side.unlink(missing_ok=True)


def _empty_stand_in() -> sqlite3.Connection:
    """An in-memory database with the buffer's (empty) tables that refuses writes."""
    con = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    con.executescript(_SCHEMA)
    con.execute("PRAGMA query_only=1")
    return con


def _valid_epoch(epoch: str) -> bool:
    return len(epoch) == 32 and all(c in "0123456789abcdef" for c in epoch)


def _info(con: sqlite3.Connection, key: str) -> str | None:
    row = con.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
    return str(row[0]) if row is not None and row[0] else None


def _record_cols(epoch_col: str, dict_col: str) -> str:
    """The columns of a record row, in `_INSERT_RECORD`'s order."""
    return f"id, device, first_seq, last_seq, count, created, data, {epoch_col}, {dict_col}"


def _has_column(con: sqlite3.Connection, name: str) -> bool:
    return any(row[1] == name for row in con.execute("PRAGMA table_info(records)"))


def _has_epoch(con: sqlite3.Connection) -> bool:
    """Whether the records table has its epoch column (format 2)."""
    return any(row[1] == "epoch" for row in con.execute("PRAGMA table_info(records)"))


def _fsync_dir(path: Path) -> None:
    """Flush a directory, so a file created or renamed in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fdatasync(fd: int) -> None:
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)
