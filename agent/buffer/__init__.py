"""The store-and-forward buffer between the pollers and the publisher.

The unit stored is a *record*: the samples of one poll of one device (or of one
subscription delivery), encoded once as a JSON array of Sample objects (the wire form,
see `agent.schema`). Records are deleted only after the broker acknowledged them.

Invariants every implementation keeps:
- `append` returns only after the record is durable (per the configured durability);
- records come out of `take` oldest first (by id), and `take(after_id=x)` never returns
  a record with id <= x;
- `commit(ids)` deletes exactly those records; unknown ids are ignored;
- `last_seq()` is at least the highest seq ever appended, across restarts, so a
  restarted agent never reuses a seq;
- the stored size stays within `max_bytes` (plus a documented margin); when full the
  `when_full` policy applies and every dropped sample is counted in `stats()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.schema import WireSample


@dataclass(frozen=True, slots=True)
class Record:
    """One buffered batch: the samples of one poll of one device."""

    id: int
    device: str
    first_seq: int
    last_seq: int
    count: int
    created: float  # epoch seconds when appended
    data: bytes  # orjson-encoded JSON array of Sample objects


@dataclass(frozen=True, slots=True)
class BufferStats:
    records: int  # records waiting
    samples: int  # samples waiting
    bytes: int  # size counted against max_bytes
    max_bytes: int
    oldest_created: float | None  # epoch seconds of the oldest waiting record
    last_seq: int
    appended_samples: int  # since open
    committed_samples: int  # delivered and deleted, since open
    dropped_samples: int  # dropped by the when_full policy, since open
    dropped_records: int


class Buffer(Protocol):
    async def open(self) -> None:
        """Create or recover the store."""

    async def close(self) -> None:
        """Flush and close; never raises."""

    def last_seq(self) -> int:
        """Highest seq ever appended (0 for a new buffer). Valid after open()."""

    async def append(self, device: str, samples: Sequence[WireSample]) -> None:
        """Store one batch durably in one transaction. `samples` carry their seq,
        strictly increasing and above last_seq()."""

    async def take(self, max_records: int, after_id: int = 0) -> list[Record]:
        """Oldest records with id > after_id, at most max_records. Does not remove them."""

    async def wait(self, after_id: int) -> None:
        """Return as soon as a record with id > after_id exists (at once if one does)."""

    async def commit(self, ids: Sequence[int]) -> None:
        """Delete delivered records."""

    def stats(self) -> BufferStats:
        """Current figures (cheap; no I/O)."""
