"""Salvage of a damaged buffer file: read every record that still reads back whole and
copy it into a new file; work out the seq ranges of what could not be read.

Used by `agent.buffer.sqlite` at open (a file found damaged) and at run time (a file
damaged under the running agent); see "Recovery" and "A file damaged at run time"
there. Pure SQLite reads and inserts, no state of its own: the caller owns both
connections and the transaction on the new file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.buffer.common import record_samples
from agent.buffer.record import CorruptRecord, Dictionary, check_body, check_dictionary, is_body

#: Records are read this many ids at a time.
SALVAGE_CHUNK = 1024

_T = TypeVar("_T")


def seq_ranges(pairs: Sequence[tuple[int, int]]) -> list[str]:
    """Each range as "first-last", or its seq alone."""
    return [f"{a}-{b}" if a != b else str(a) for a, b in pairs]


def try_(fn: Callable[[], _T], default: _T) -> _T:
    """fn(), or `default` when the damaged file cannot answer."""
    try:
        return fn()
    except (sqlite3.Error, TypeError, ValueError):
        return default


#: id, device, first_seq, last_seq, count, created, data, epoch, dict
RecordRow = tuple[int, str, int, int, int, float, bytes, str, int]
#: The columns of a record row when the caller does not say.
DEFAULT_COLS = "id, device, first_seq, last_seq, count, created, data, epoch, dict"


@dataclass
class Copied:
    """What `_copy_intact` copied."""

    kept: list[tuple[int, int]] = field(default_factory=list)  # (first_seq, last_seq)
    samples: int = 0
    bad_after: list[int | None] = field(default_factory=list)  # seq before each bad stretch
    hi: int = 0  # highest record id the old file gave out
    high: int = 0  # highest seq of a copied record


def copy_dicts(old: sqlite3.Connection, con: sqlite3.Connection) -> dict[int, Dictionary]:
    """Copy every tag dictionary of `old` that reads back and passes its checksum into
    `con`, with its id; returns them by id. A file without the table (format 1 or 2) has
    none."""
    hi = try_(lambda: int(old.execute("SELECT coalesce(max(id), 0) FROM dicts").fetchone()[0]), -1)
    if hi < 0:  # the table's last page is unreadable: bound the ids by what refers to them
        hi = try_(
            lambda: int(old.execute("SELECT coalesce(max(dict), 0) FROM records").fetchone()[0]),
            _DICT_IDS_GUESS,
        )
    out: dict[int, Dictionary] = {}
    for did, blob in _read_dicts(old, 1, hi):
        try:
            d = check_dictionary(bytes(blob))
        except (CorruptRecord, TypeError):
            continue
        con.execute("INSERT INTO dicts (id, data) VALUES (?, ?)", (int(did), d.blob))
        out[int(did)] = d
    return out


#: Dictionary ids searched when neither table tells the highest one.
_DICT_IDS_GUESS = 4096


def _read_dicts(old: sqlite3.Connection, lo: int, hi: int) -> list[Any]:
    """The dictionary rows with lo <= id <= hi; a range that fails is split in halves."""
    if hi < lo:
        return []
    try:
        return old.execute(
            "SELECT id, data FROM dicts WHERE id BETWEEN ? AND ? ORDER BY id", (lo, hi)
        ).fetchall()
    except sqlite3.Error:
        if lo == hi:
            return []
        mid = (lo + hi) // 2
        return _read_dicts(old, lo, mid) + _read_dicts(old, mid + 1, hi)


def copy_intact(
    old: sqlite3.Connection,
    con: sqlite3.Connection,
    cols: str,
    insert_sql: str,
    skip: set[int] | frozenset[int] = frozenset(),
) -> Copied:
    """Copy every record of `old` that reads back whole into `con` (inside the caller's
    transaction, with `insert_sql` taking the 9 columns `cols` of a record), with its id,
    and the tag dictionaries they refer to; ids in `skip` are left out. Ids stay above
    every id the old file gave out, like AUTOINCREMENT."""
    out = Copied()
    dicts = copy_dicts(old, con)
    hi = try_(
        lambda: int(
            old.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()[0]
        ),
        0,
    )
    hi = max(
        hi,
        try_(lambda: int(old.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0]), 0),
    )
    lo = try_(lambda: int(old.execute("SELECT coalesce(min(id), 1) FROM records").fetchone()[0]), 1)
    in_bad = False
    for start in range(max(lo, 1), hi + 1, SALVAGE_CHUNK):
        end = min(start + SALVAGE_CHUNK - 1, hi)
        for row in read_range(old, start, end, cols, dicts):
            if row is None:
                if not in_bad:
                    out.bad_after.append(out.kept[-1][1] if out.kept else None)
                    in_bad = True
                continue
            in_bad = False
            if row[0] in skip:
                continue
            con.execute(insert_sql, row)
            out.kept.append((int(row[2]), int(row[3])))
            out.samples += int(row[4])
    out.hi = hi
    out.high = max((b for _, b in out.kept), default=0)
    cur = con.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'records'", (hi,))
    if cur.rowcount == 0 and hi:
        con.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (hi,))
    return out


def lost_ranges(copied: Copied, high: int, floor: int) -> list[tuple[int, int]]:
    """The seq range of each unreadable stretch: from after the intact record before it
    (or `floor`) to before the intact record after it (or `high`). Records are in seq
    order by id, so the lost samples lie there (with, possibly, seqs delivered before)."""
    lost: list[tuple[int, int]] = []
    for before in copied.bad_after:
        first = max((before or 0) + 1, floor)
        nxt = next((a for a, _ in copied.kept if a >= first), None)
        last = nxt - 1 if nxt is not None else high
        if last >= first:
            lost.append((first, last))
    return lost


def read_range(
    old: sqlite3.Connection,
    lo: int,
    hi: int,
    cols: str = DEFAULT_COLS,
    dicts: dict[int, Dictionary] | None = None,
) -> list[RecordRow | None]:
    """The records with lo <= id <= hi of a damaged file, in id order: a row, or None
    for a stretch that cannot be read (a range that fails is split in halves down to
    single ids) or whose data does not hold what its columns say (see `intact`)."""
    try:
        rows = old.execute(
            f"SELECT {cols} FROM records WHERE id BETWEEN ? AND ? ORDER BY id", (lo, hi)
        ).fetchall()
    except sqlite3.Error:
        if lo == hi:
            return [None]
        mid = (lo + hi) // 2
        return read_range(old, lo, mid, cols, dicts) + read_range(old, mid + 1, hi, cols, dicts)
    return [row if intact(row, dicts or {}) else None for row in rows]


def intact(row: Any, dicts: dict[int, Dictionary]) -> bool:
    """Whether a row reads back whole: a format-3 body passes its checksum, matches its
    row's seqs and count and belongs to a dictionary in `dicts` (by id and checksum) of
    its device; a format-2 row's JSON decodes to exactly its seq range and device."""
    try:
        rid, device, first, last, count, created, data, epoch, did = row
        if not (isinstance(rid, int) and isinstance(created, float) and isinstance(epoch, str)):
            return False
        if is_body(data):
            head = check_body(data)
            if (head.first_seq, head.last_seq, head.count) != (first, last, count):
                return False
            if head.json:
                return True
            d = dicts.get(did)
            return d is not None and d.crc == head.dict_crc and d.device == device
        samples = record_samples(data)
        return (
            isinstance(samples, list)
            and len(samples) == count > 0
            and samples[0]["seq"] == first
            and samples[-1]["seq"] == last
            and all(s["device"] == device for s in samples)
            and isinstance(rid, int)
            and isinstance(created, float)
            and isinstance(epoch, str)
        )
    except (TypeError, ValueError, KeyError):
        return False
