"""The dead-letter store keeps the buffer epoch of each record it sets aside, so a replay
publishes the seqs under the epoch they were made in, and a store written before the
epoch was kept opens with '' (the current epoch) for its entries."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.buffer import Record
from agent.publish.deadletter import DeadLetters


async def test_the_epoch_is_kept_and_given_back_on_replay(tmp_path: Path) -> None:
    store = DeadLetters(str(tmp_path / "dl.sqlite"))
    try:
        old = Record(1, "press", 1, 3, 3, 0.0, b"[]", epoch="a" * 32)
        await store.add(old, "Not authorized", 0x87, 1)
        await store.request_replay(None)
        (letter,) = await store.take_replays(10)
        assert letter.epoch == "a" * 32
        assert letter.as_record().epoch == "a" * 32
    finally:
        store.close()


async def test_a_store_from_before_the_epoch_column_opens_and_keeps_its_entries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dl.sqlite"
    con = sqlite3.connect(path)
    con.execute(
        "create table dead_letters (id integer primary key autoincrement, moved_at real not"
        " null, device text not null, first_seq integer not null, last_seq integer not null,"
        " count integer not null, created real not null, reason text not null, code integer,"
        " tries integer not null, data blob not null, announced integer not null default 0,"
        " replay integer not null default 0)"
    )
    con.execute(
        "insert into dead_letters (moved_at, device, first_seq, last_seq, count, created,"
        " reason, code, tries, data) values (1.0, 'press', 5, 6, 2, 0.5, 'Not authorized',"
        " 135, 1, x'5b5d')"
    )
    con.commit()
    con.close()
    store = DeadLetters(str(path))
    try:
        (letter,) = await store.unannounced()
        assert (letter.device, letter.first_seq, letter.last_seq) == ("press", 5, 6)
        assert letter.epoch == ""  # published with the current epoch, as before
    finally:
        store.close()
