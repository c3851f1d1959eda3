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
  `when_full` policy applies and every dropped sample is counted in `stats()`, and its
  seq range is kept as a `Gap` until the consumer of `take_gaps()` calls `clear_gaps()`.

docs/delivery.md states what this promises to the operator and the data team.
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
class Gap:
    """Seqs that will never be delivered: samples with seq in [first_seq, last_seq] were
    dropped (`count` of them). The range can also hold seqs of samples delivered before
    the drop, when records of other devices were interleaved.

    `reason`: ``drop_oldest`` / ``drop_newest`` (the when_full policy), ``too_large`` (one
    batch above max_bytes), ``max_age`` (older than max_age_s), ``memory_full`` (the disk
    failed and the memory fallback overflowed), ``corrupt`` (unreadable in a damaged file
    at start; `count` is then an upper bound: the range is where the lost samples were)."""

    first_seq: int
    last_seq: int
    count: int
    reason: str


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
    #: True while the disk fails and new records are held in memory (see sqlite.py).
    degraded: bool = False
    degraded_reason: str | None = None
    memory_records: int = 0  # records held in memory while degraded (included above)
    memory_bytes: int = 0

    @property
    def health(self) -> str:
        """``ok``, or ``degraded`` while the buffer's disk fails."""
        return "degraded" if self.degraded else "ok"


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

    async def take_gaps(self) -> list[Gap]:
        """Seq ranges that were dropped (oldest first), kept (across restarts for the
        durable buffer) until `clear_gaps`."""

    async def clear_gaps(self, through_seq: int) -> None:
        """Forget the gaps whose last_seq <= through_seq, once they were reported."""

    def stats(self) -> BufferStats:
        """Current figures (cheap; no I/O)."""
