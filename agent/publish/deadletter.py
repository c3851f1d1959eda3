"""Dead letters: records the broker refused too often to keep retrying.

A PUBACK with a failure reason (0x87 Not authorized, 0x97 Quota exceeded, 0x95 Packet too
large, ...) will usually be answered the same way next time, and retrying the oldest
record forever would hold back everything behind it. After `mqtt.max_refusals` refusals
the forwarder moves the record here — with the reason, the code and the number of tries
— and only then deletes it from the buffer. Nothing is dropped silently: an operator can
read the file (`sqlite3 <buffer>.deadletter.sqlite 'select * from dead_letters'`), fix the
ACL or the quota, and re-publish.

Its own small SQLite file next to the buffer file (``<buffer path>.deadletter.sqlite``),
so the buffer's format is untouched; in memory for a memory buffer. Writes are rare and
run in a worker thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass

from agent.buffer import Record

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


@dataclass(frozen=True, slots=True)
class DeadLetter:
    device: str
    first_seq: int
    last_seq: int
    count: int
    reason: str
    code: int | None
    tries: int
    data: bytes


class DeadLetters:
    """Append-only store of refused records. path None: kept in memory."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._memory: list[DeadLetter] = []
        self.moved_records = 0
        self.moved_samples = 0

    async def add(self, record: Record, reason: str, code: int | None, tries: int) -> None:
        """Store `record` durably (when file-backed) before the caller deletes it."""
        letter = DeadLetter(
            record.device,
            record.first_seq,
            record.last_seq,
            record.count,
            reason,
            code,
            tries,
            record.data,
        )
        if self.path is None:
            self._memory.append(letter)
        else:
            await asyncio.to_thread(self._add_sync, self.path, letter, record.created)
        self.moved_records += 1
        self.moved_samples += record.count

    async def all(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        if self.path is None:
            return list(self._memory)
        return await asyncio.to_thread(self._all_sync, self.path)

    @staticmethod
    def _add_sync(path: str, letter: DeadLetter, created: float) -> None:
        con = sqlite3.connect(path)
        try:
            with con:
                con.execute(_SCHEMA)
                con.execute(
                    "insert into dead_letters (moved_at, device, first_seq, last_seq, count,"
                    " created, reason, code, tries, data) values (?,?,?,?,?,?,?,?,?,?)",
                    (
                        time.time(),
                        letter.device,
                        letter.first_seq,
                        letter.last_seq,
                        letter.count,
                        created,
                        letter.reason,
                        letter.code,
                        letter.tries,
                        letter.data,
                    ),
                )
        finally:
            con.close()

    @staticmethod
    def _all_sync(path: str) -> list[DeadLetter]:
        con = sqlite3.connect(path)
        try:
            con.execute(_SCHEMA)
            rows = con.execute(
                "select device, first_seq, last_seq, count, reason, code, tries, data"
                " from dead_letters order by id"
            ).fetchall()
        finally:
            con.close()
        return [DeadLetter(*row) for row in rows]


__all__ = ["DeadLetter", "DeadLetters"]
