"""The store-and-forward buffer between the pollers and the publisher.

The unit stored is a *record*: the samples of one poll of one device (or of one
subscription delivery), encoded once as a JSON array of Sample objects (the wire form,
see `agent.schema`). Records are deleted only after the broker acknowledged them.

Invariants every implementation keeps:
- `append` returns only after the record is durable (per the configured durability);
- records come out of `take` oldest first (by id), and `take(after_id=x)` never returns
  a record with id <= x;
- `commit(ids)` deletes exactly those records; unknown ids are ignored;
- the identity of a sample is ``(agent, epoch, seq)``: `epoch` is a random id made when
  the store is created (and again whenever its seq state is lost or cannot be trusted:
  a new file, a replaced file, a lost or mismatching ``<path>.seq``), and within one
  epoch a seq is never handed out twice, across crashes and power cuts. Every `Record`
  and `Gap` carries the epoch its seqs belong to (records made before an epoch change
  keep the old one);
- `last_seq()` is at least the highest seq ever appended in the current epoch, across
  restarts. The durable buffer leases seqs in blocks, fsynced before a record using them
  commits, so after an unclean stop it continues above the lease and reports the unused
  rest of it as a gap (reason ``skipped``);
- the stored size stays within `max_bytes` (plus a documented margin); when full the
  `when_full` policy applies and every dropped sample is counted in `stats()`, and its
  seq range is kept as a `Gap` until the consumer of `take_gaps()` calls `clear_gaps()`;
- `take`, `commit`, `append`, `take_gaps` and `clear_gaps` do not raise for a failing or
  damaged disk: the durable buffer degrades to memory, or salvages a damaged file into a
  new one and reports the loss as a gap (reason ``corrupt``). They raise for a
  programming error (bad seqs, not open) and for SQLite errors that are neither a disk
  failure nor damage (unexpected; the caller's supervision handles those).

docs/delivery.md states what this promises to the operator and the data team.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    #: The buffer epoch the seqs belong to: consumers deduplicate on (agent, epoch, seq).
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs that will never be delivered: samples with seq in [first_seq, last_seq] were
    dropped (`count` of them). The range can also hold seqs of samples delivered before
    the drop, when records of other devices were interleaved.

    `reason`: ``drop_oldest`` / ``drop_newest`` (the when_full policy), ``too_large`` (one
    batch above max_bytes), ``max_age`` (older than max_age_s), ``memory_full`` (the disk
    failed and the memory fallback overflowed), ``corrupt`` (unreadable in a damaged file,
    at start or at run time; `count` is then an upper bound: the range is where the lost
    samples were), ``skipped`` (seqs leased before an unclean stop and not known to be
    used: never handed out again; `count` is the size of the range, an upper bound — after
    a crash of the process none of them was used, after a power cut some may have been).

    `epoch`: the buffer epoch the seq range belongs to."""

    first_seq: int
    last_seq: int
    count: int
    reason: str
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Salvage:
    """What one salvage of a damaged buffer file did (see agent/buffer/sqlite.py)."""

    at: float  # epoch seconds
    at_start: bool  # found at open (True) or while running (False)
    moved_to: str  # where the damaged file went
    error: str  # the SQLite error that revealed the damage
    recovered_records: int
    recovered_samples: int
    #: Samples lost (run time: the samples waiting minus those recovered, from the
    #: buffer's own figures; at start None: only the seq ranges are known).
    lost_samples: int | None
    lost_seq_ranges: tuple[str, ...]  # "first-last" of each range reported as a gap


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
    #: The SQLite error name (e.g. ``SQLITE_FULL``), or ``corrupt`` while a damaged file
    #: could not be salvaged yet.
    degraded_reason: str | None = None
    memory_records: int = 0  # records held in memory while degraded (included above)
    memory_bytes: int = 0
    #: True while new records go to the memory fallback (the durable buffer's disk fails).
    memory_fallback: bool = False
    epoch: str = ""  # the epoch of new records
    #: Highest seq covered by the durable lease (0 for the memory buffer).
    leased_seq: int = 0
    #: False while the lease cannot be written (the disk fails): a power cut in this state
    #: could let seqs be handed out again in the same epoch.
    lease_ok: bool = True
    #: Damaged buffer files moved aside since open (at start and at run time).
    damaged_files: int = 0
    last_salvage: Salvage | None = None
    #: dropped_samples per gap reason (drop_oldest, memory_full, corrupt, ...).
    dropped_by_reason: Mapping[str, int] = field(default_factory=dict)

    @property
    def health(self) -> str:
        """``ok``, or ``degraded`` while the buffer's disk fails (or a damaged file could
        not be salvaged yet)."""
        return "degraded" if self.degraded else "ok"


class Buffer(Protocol):
    async def open(self) -> None:
        """Create or recover the store."""

    async def close(self) -> None:
        """Flush and close; never raises."""

    @property
    def epoch(self) -> str:
        """The epoch of new records (32 hex digits). Valid after open()."""
        ...

    def last_seq(self) -> int:
        """Highest seq ever appended in the current epoch (0 for a new buffer), or above:
        the durable buffer continues above its lease after an unclean stop. Valid after
        open()."""

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
