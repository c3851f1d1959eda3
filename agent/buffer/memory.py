"""A buffer in memory: the same behaviour as `agent.buffer.sqlite` (size accounting,
when_full policies, gaps, stats) without durability. For tests, and as an opt-in
(`buffer.kind: memory`) where losing the backlog on restart is acceptable.

Everything runs on the event loop; no method awaits anything but `wait()`, so each
operation is atomic with respect to the other tasks.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Sequence

from agent.buffer import BufferStats, Record
from agent.buffer.common import (
    DropEpisode,
    DropReason,
    Gap,
    GapList,
    Notifier,
    new_epoch,
    record_size,
)
from agent.buffer.record import RecordEncoder
from agent.config import BufferConfig
from agent.schema import WireSample


class MemoryBuffer:
    """The Buffer protocol in memory (see the module docstring)."""

    def __init__(self, config: BufferConfig) -> None:
        self._config = config
        self._records: dict[int, Record] = {}
        # Sorted ids, with deleted ones removed lazily: take() bisects instead of scanning.
        self._ids: list[int] = []
        self._next_id = 1
        self._last_seq = 0
        self._bytes = 0
        self._samples = 0
        self._appended = 0
        self._committed = 0
        self._dropped_samples = 0
        self._dropped_records = 0
        self._gaps = GapList()
        self._episode = DropEpisode(config.when_full, config.max_bytes, "memory")
        self._age_episode = DropEpisode(
            "max_age", config.max_bytes, "memory", event="buffer.max_age"
        )
        self._notifier = Notifier()
        self._open = False
        self._epoch = new_epoch()
        self._dropped_by: dict[str, int] = {}
        self._encoder = RecordEncoder()

    async def open(self) -> None:
        """Nothing to recover: a memory buffer starts empty, with a new epoch (its seqs
        start again at 1, so they must not be confused with an earlier run's)."""
        if not self._records and self._last_seq == 0:
            self._epoch = new_epoch()
        self._open = True

    @property
    def epoch(self) -> str:
        """The epoch of this buffer's records (made at open)."""
        return self._epoch

    async def close(self) -> None:
        """Forget nothing (the object keeps its records) but refuse further appends."""
        self._open = False

    def last_seq(self) -> int:
        """Highest seq ever appended to this object (0 when new)."""
        return self._last_seq

    async def append(self, device: str, samples: Sequence[WireSample]) -> None:
        """Store one batch, or drop per `when_full`; raises ValueError on bad seqs.
        An empty batch is ignored."""
        if not self._open:
            raise RuntimeError("buffer is not open")
        if not samples:
            return
        batch = self._encoder.encode(samples, self._last_seq)
        # Self-contained records (dictionary + body), counted whole: no dictionary table.
        data = batch.full
        now = time.time()
        self._expire(now)
        size = record_size(len(data))
        limit = self._config.max_bytes
        self._last_seq = batch.last_seq
        refused: DropReason | None = None
        if size > limit:
            refused = "too_large"
        elif self._bytes + size > limit and self._config.when_full == "drop_newest":
            refused = "drop_newest"
        if refused is not None:
            self._gaps.add(Gap(batch.first_seq, batch.last_seq, batch.count, refused, self._epoch))
            self._count_drop(refused, 1, batch.count)
            self._episode.dropped(refused, 1, batch.count, self._bytes)
            return
        evicted_records = evicted_samples = 0
        while self._bytes + size > limit:
            evicted_records += 1
            evicted_samples += self._drop_oldest("drop_oldest").count
        if evicted_records:
            self._count_drop("drop_oldest", evicted_records, evicted_samples)
            self._episode.dropped("drop_oldest", evicted_records, evicted_samples, self._bytes)
        rid = self._next_id
        self._next_id += 1
        self._records[rid] = Record(
            rid, device, batch.first_seq, batch.last_seq, batch.count, now, data, self._epoch
        )
        self._ids.append(rid)
        self._bytes += size
        self._samples += batch.count
        self._appended += batch.count
        if not evicted_records:
            self._episode.fitted(self._bytes)
        self._notifier.notify()

    def _expire(self, now: float) -> None:
        """Drop the records older than max_age_s (gaps with reason max_age)."""
        max_age = self._config.max_age_s
        if max_age is None:
            return
        records = samples = 0
        while self._records and self._records[self._oldest_id()].created < now - max_age:
            records += 1
            samples += self._drop_oldest("max_age").count
        if records:
            self._count_drop("max_age", records, samples)
            self._age_episode.dropped("max_age", records, samples, self._bytes)

    def _drop_oldest(self, reason: DropReason) -> Record:
        """Remove the oldest record, recording its seqs as a gap with `reason`."""
        old = self._records.pop(self._oldest_id())
        self._bytes -= record_size(len(old.data))
        self._samples -= old.count
        self._gaps.add(Gap(old.first_seq, old.last_seq, old.count, reason, old.epoch))
        return old

    def _count_drop(self, reason: str, records: int, samples: int) -> None:
        self._dropped_samples += samples
        self._dropped_records += records
        self._dropped_by[reason] = self._dropped_by.get(reason, 0) + samples

    def _oldest_id(self) -> int:
        for i, rid in enumerate(self._ids):
            if rid in self._records:
                del self._ids[:i]
                return rid
        raise AssertionError("bytes > 0 but no record")  # pragma: no cover

    async def take(self, max_records: int, after_id: int = 0) -> list[Record]:
        """Oldest records with id > after_id, at most max_records; not removed."""
        out: list[Record] = []
        if max_records <= 0:
            return out
        for rid in self._ids[bisect_right(self._ids, after_id) :]:
            rec = self._records.get(rid)
            if rec is not None:
                out.append(rec)
                if len(out) >= max_records:
                    break
        return out

    async def wait(self, after_id: int) -> None:
        """Return once a record with id > after_id exists."""
        while not self._has_after(after_id):
            await self._notifier.wait()

    def _has_after(self, after_id: int) -> bool:
        # Deleted ids linger at the tail of _ids only until compaction: check membership.
        for rid in reversed(self._ids):
            if rid <= after_id:
                return False
            if rid in self._records:
                return True
        return False

    async def commit(self, ids: Sequence[int]) -> None:
        """Delete delivered records; unknown ids are ignored."""
        for rid in ids:
            rec = self._records.pop(rid, None)
            if rec is not None:
                self._bytes -= record_size(len(rec.data))
                self._samples -= rec.count
                self._committed += rec.count
                self._age_episode.fitted(self._bytes)
        if len(self._ids) > 2 * len(self._records) + 64:
            self._ids = [rid for rid in self._ids if rid in self._records]

    async def take_gaps(self) -> list[Gap]:
        """Seq ranges dropped (when_full policy, max_age), oldest first."""
        return list(self._gaps.gaps)

    async def clear_gaps(self, through_seq: int) -> None:
        """Forget the gaps whose last_seq <= through_seq (once they were reported)."""
        self._gaps.clear(through_seq)

    def stats(self) -> BufferStats:
        """Current figures (no I/O)."""
        oldest: float | None = None
        if self._records:
            oldest = self._records[self._oldest_id()].created
        return BufferStats(
            records=len(self._records),
            samples=self._samples,
            bytes=self._bytes,
            max_bytes=self._config.max_bytes,
            oldest_created=oldest,
            last_seq=self._last_seq,
            appended_samples=self._appended,
            committed_samples=self._committed,
            dropped_samples=self._dropped_samples,
            dropped_records=self._dropped_records,
            epoch=self._epoch,
            dropped_by_reason=dict(self._dropped_by),
        )
