"""Dead letters: records that cannot be published as they are, set aside with the reason.

The forwarder moves a record here — and only then deletes it from the buffer — when it
can never be published as it is: the broker refuses its topic (PUBACK 0x87 Not
authorized, 0x90 Topic name invalid, 0x99 Payload format invalid), paho rejects it (a
topic with ``+`` or ``#``), the encoder raises on it, or a single sample is larger than the
broker's Maximum Packet Size. Refusals that may be transient (0x97 Quota exceeded, 0x80
Unspecified error, ...) are retried with backoff for that device only, and land here after
``mqtt.max_refusals`` refusals. docs/mqtt.md describes the whole policy.

Its own small SQLite file next to the buffer file (``<buffer path>.deadletter.sqlite``),
so the buffer's format is untouched; in memory for a memory buffer. The store is bounded
in bytes (sum of the stored sample data, ``max_bytes``): when an addition takes it over,
its oldest entries are deleted, counted in `dropped_records` / `dropped_samples` and logged
(``deadletter.dropped``, ERROR).

Each entry also carries two flags for the forwarder:

- ``announced``: the gap notice for its seqs (reason ``dead_letter``) rode on a message the
  broker acknowledged. Until then the forwarder keeps announcing it, also after a restart.
- ``replay``: an operator asked for it to be sent again (``edge-agent deadletter replay``,
  possibly from another process while the agent runs). The running forwarder picks such
  entries up within a few seconds, publishes them with their original seqs (marked
  historical) and deletes them once acknowledged; an entry refused again goes back to
  being a dead letter with its tries counted.

Writes are rare and run in a worker thread, on one connection guarded by a lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import structlog

from agent.buffer import Record

log = structlog.get_logger()
_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Default bound of the store: the sum of its entries' sample data, in bytes.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """
create table if not exists dead_letters (
    id integer primary key,
    moved_at real not null,
    device text not null,
    first_seq integer not null,
    last_seq integer not null,
    count integer not null,
    created real not null,
    reason text not null,
    code integer,
    tries integer not null,
    data blob not null
)
"""
# Columns added after the first release; added to older files when opened.
_MIGRATIONS = (
    "alter table dead_letters add column announced integer not null default 0",
    "alter table dead_letters add column replay integer not null default 0",
    # The buffer epoch of the record's seqs ('' in entries made before it was kept: they
    # are published with the current epoch, as they always were).
    "alter table dead_letters add column epoch text not null default ''",
)
_COLUMNS = (
    "id, moved_at, device, first_seq, last_seq, count, created, reason, code, tries,"
    " announced, replay, epoch, data"
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    moved_at: float  # epoch seconds when it was set aside
    device: str
    first_seq: int
    last_seq: int
    count: int
    created: float  # epoch seconds when the record was appended to the buffer
    reason: str
    code: int | None
    tries: int
    announced: bool  # its gap notice was delivered
    replay: bool  # queued for replay
    epoch: str  # the buffer epoch of its seqs ('' = not known: the current one)
    data: bytes

    def as_record(self) -> Record:
        """The record as the forwarder publishes it (id is the dead letter's, not a
        buffer id: it is never committed to the buffer)."""
        return Record(
            id=self.id,
            device=self.device,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            count=self.count,
            created=self.created,
            data=self.data,
            epoch=self.epoch,
        )


@dataclass(frozen=True, slots=True)
class DeadLetterStats:
    entries: int
    samples: int
    bytes: int
    max_bytes: int
    replay_pending: int
    dropped_records: int  # deleted to keep within max_bytes, since open
    dropped_samples: int


class DeadLetters:
    """Bounded store of records set aside. path None: kept in memory (lost at exit)."""

    def __init__(self, path: str | None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.moved_records = 0
        self.moved_samples = 0
        self.dropped_records = 0
        self.dropped_samples = 0
        self._con: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._entries = 0
        self._samples = 0
        self._bytes = 0
        self._replay_pending = 0

    # ------------------------------------------------------------------ async API

    async def add(self, record: Record, reason: str, code: int | None, tries: int) -> int:
        """Store `record` durably (when file-backed) before the caller deletes it.
        Returns its id. May delete the oldest entries to stay within max_bytes."""
        letter_id, dropped = await self._call(self._add_sync, record, reason, code, tries)
        self.moved_records += 1
        self.moved_samples += record.count
        if dropped:
            records = len(dropped)
            samples = sum(count for count in dropped)
            self.dropped_records += records
            self.dropped_samples += samples
            log.error(
                "deadletter.dropped",
                records=records,
                samples=samples,
                max_bytes=self.max_bytes,
                store=self.path or "memory",
                note="oldest dead letters deleted to stay within the limit",
            )
        return letter_id

    async def all(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        return await self._call(self._select, "1", ())

    async def unannounced(self) -> list[DeadLetter]:
        """Dead letters whose gap notice was not yet delivered, oldest first (their
        `data` is left out: only the seqs are needed)."""
        return await self._call(self._select, "announced = 0", (), -1, False)

    async def mark_announced_through(self, last_id: int) -> None:
        """The gap notices of every entry with id <= last_id were delivered."""
        await self._call(self._announced_through, last_id)

    async def request_replay(self, ids: Sequence[int] | None, device: str | None = None) -> int:
        """Queue entries for replay: `ids` (None: all), optionally only `device`'s.
        Returns how many entries are now queued by this call."""
        return await self._call(self._request_replay_sync, ids, device)

    async def take_replays(self, limit: int) -> list[DeadLetter]:
        """Up to `limit` entries queued for replay, oldest first."""
        return await self._call(self._select, "replay = 1", (), limit)

    async def replayed(self, ids: Sequence[int]) -> None:
        """Delivered: delete them."""
        if ids:
            await self._call(self._update_many, "delete from dead_letters", ids)

    async def replay_failed(self, letter_id: int, reason: str, code: int | None) -> None:
        """Refused again: a dead letter once more, with one more try counted."""
        await self._call(self._replay_failed_sync, letter_id, reason, code)

    async def refresh(self) -> DeadLetterStats:
        """Re-read how many entries are queued for replay: the one thing another process
        (``edge-agent deadletter replay``) changes in the store."""
        await self._call(self._count_replay)
        return self.stats()

    def stats(self) -> DeadLetterStats:
        """Figures as of the last operation (cheap; no I/O)."""
        return DeadLetterStats(
            entries=self._entries,
            samples=self._samples,
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            replay_pending=self._replay_pending,
            dropped_records=self.dropped_records,
            dropped_samples=self.dropped_samples,
        )

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    # ------------------------------------------------------------------ sync (thread)

    async def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self.path is None:
            # In memory: no disk I/O, so no thread hop (and no second connection).
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            con = sqlite3.connect(self.path or ":memory:", timeout=10.0, check_same_thread=False)
            con.execute(_SCHEMA)
            have = {row[1] for row in con.execute("pragma table_info(dead_letters)")}
            for statement in _MIGRATIONS:
                column = statement.split(" add column ")[1].split()[0]
                if column not in have:
                    con.execute(statement)
            con.commit()
            self._con = con
            self._count_locked()
        return self._con

    def _count_locked(self) -> None:
        assert self._con is not None
        entries, samples, size, replay = self._con.execute(
            "select count(*), coalesce(sum(count), 0), coalesce(sum(length(data)), 0),"
            " coalesce(sum(replay), 0) from dead_letters"
        ).fetchone()
        self._entries, self._samples, self._bytes = int(entries), int(samples), int(size)
        self._replay_pending = int(replay)

    def _count_replay(self) -> None:
        with self._lock:
            (replay,) = (
                self._db().execute("select count(*) from dead_letters where replay = 1").fetchone()
            )
            self._replay_pending = int(replay)

    def _add_sync(
        self, record: Record, reason: str, code: int | None, tries: int
    ) -> tuple[int, list[int]]:
        with self._lock:
            con = self._db()
            with con:
                cur = con.execute(
                    "insert into dead_letters (moved_at, device, first_seq, last_seq, count,"
                    " created, reason, code, tries, epoch, data)"
                    " values (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        time.time(),
                        record.device,
                        record.first_seq,
                        record.last_seq,
                        record.count,
                        record.created,
                        reason,
                        code,
                        tries,
                        record.epoch,
                        record.data,
                    ),
                )
                letter_id = int(cur.lastrowid or 0)
                self._bytes += len(record.data)
                dropped: list[int] = []
                # Drop the oldest while over the bound; the newest entry always stays.
                while self._bytes > self.max_bytes:
                    row = con.execute(
                        "select id, count, length(data) from dead_letters where id != ?"
                        " order by id limit 1",
                        (letter_id,),
                    ).fetchone()
                    if row is None:
                        break
                    con.execute("delete from dead_letters where id = ?", (row[0],))
                    self._bytes -= int(row[2])
                    dropped.append(int(row[1]))
            self._count_locked()
            return letter_id, dropped

    def _select(
        self, where: str, params: tuple[Any, ...], limit: int = -1, data: bool = True
    ) -> list[DeadLetter]:
        columns = _COLUMNS if data else _COLUMNS.replace(", data", ", x''")
        sql = f"select {columns} from dead_letters where {where} order by id limit ?"
        with self._lock:
            rows = self._db().execute(sql, (*params, limit)).fetchall()
        return [
            DeadLetter(
                id=row[0],
                moved_at=row[1],
                device=row[2],
                first_seq=row[3],
                last_seq=row[4],
                count=row[5],
                created=row[6],
                reason=row[7],
                code=row[8],
                tries=row[9],
                announced=bool(row[10]),
                replay=bool(row[11]),
                epoch=str(row[12]),
                data=bytes(row[13]),
            )
            for row in rows
        ]

    def _update_many(self, statement: str, ids: Sequence[int]) -> None:
        with self._lock:
            con = self._db()
            with con:
                con.executemany(f"{statement} where id = ?", [(i,) for i in ids])
            self._count_locked()

    def _announced_through(self, last_id: int) -> None:
        with self._lock:
            con = self._db()
            with con:
                con.execute(
                    "update dead_letters set announced = 1 where announced = 0 and id <= ?",
                    (last_id,),
                )

    def _request_replay_sync(self, ids: Sequence[int] | None, device: str | None) -> int:
        where = ["replay = 0"]
        params: list[Any] = []
        if ids is not None:
            where.append(f"id in ({','.join('?' * len(ids))})" if ids else "0")
            params.extend(ids)
        if device is not None:
            where.append("device = ?")
            params.append(device)
        with self._lock:
            con = self._db()
            with con:
                cur = con.execute(
                    f"update dead_letters set replay = 1 where {' and '.join(where)}", params
                )
            self._count_locked()
            return int(cur.rowcount)

    def _replay_failed_sync(self, letter_id: int, reason: str, code: int | None) -> None:
        with self._lock:
            con = self._db()
            with con:
                con.execute(
                    "update dead_letters set replay = 0, tries = tries + 1, reason = ?,"
                    " code = ?, moved_at = ? where id = ?",
                    (reason, code, time.time(), letter_id),
                )
            self._count_locked()


__all__ = ["DEFAULT_MAX_BYTES", "DeadLetter", "DeadLetterStats", "DeadLetters"]
