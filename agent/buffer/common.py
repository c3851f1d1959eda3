"""Helpers shared by the buffer implementations: record decoding, size
accounting, the drop-episode log, gaps, the append notifier, and `open_buffer`.

Both implementations (`agent.buffer.sqlite`, `agent.buffer.memory`) follow the same rules
so that tests written against one hold for the other:

- a record's size is ``len(data) + RECORD_OVERHEAD_BYTES`` and the sum of the sizes of the
  waiting records never exceeds ``max_bytes``;
- a batch larger than ``max_bytes`` on its own is refused (reason ``too_large``) whatever
  the policy; ``drop_oldest`` evicts the oldest records (reason ``drop_oldest``) until the
  new one fits; ``drop_newest`` refuses the new one (reason ``drop_newest``);
- a refused batch still advances ``last_seq()``: its seqs were used and are reported as a
  gap, never handed out again.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog

from agent.buffer import Gap as Gap  # re-exported: it used to be defined here
from agent.buffer.record import EncodedBatch as EncodedBatch  # re-exported
from agent.buffer.record import RecordEncoder, decode_samples, is_record
from agent.schema import WireSample

if TYPE_CHECKING:
    from agent.buffer import Buffer
    from agent.config import BufferConfig

#: Counted against max_bytes for every record besides its data: the row's other columns
#: (id, device name, seqs, count, timestamp ≈ 40-80 bytes), the SQLite cell header and
#: pointer, and its share of the B-tree's interior pages. An estimate, deliberately on the
#: high side for small records; see the margin note in `agent.buffer.sqlite`.
RECORD_OVERHEAD_BYTES = 128

#: The gaps table keeps at most this many ranges (contiguous ranges are merged, so this
#: is only reached when drops and deliveries interleave for a long time); beyond it the
#: oldest ranges are forgotten and counted in `gaps_forgotten`.
GAPS_MAX = 10_000

DropReason = Literal["drop_oldest", "drop_newest", "too_large", "max_age", "memory_full", "corrupt"]

log = structlog.get_logger()


def new_epoch() -> str:
    """A fresh buffer epoch: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def record_size(data_len: int) -> int:
    """Bytes a record of `data_len` bytes of data counts against max_bytes."""
    return data_len + RECORD_OVERHEAD_BYTES


def encode_batch(samples: Sequence[WireSample], last_seq: int) -> EncodedBatch:
    """Check the seqs of a batch and encode it as a record (`agent.buffer.record`), with
    a fresh encoder (no dictionary kept: the buffers keep their own `RecordEncoder`).

    Raises ValueError when the batch is empty, or when seqs are not strictly increasing
    or not above `last_seq`."""
    return RecordEncoder().encode(samples, last_seq)


def record_samples(data: bytes) -> list[dict[str, Any]]:
    """The samples of a record's `data`, in seq order: the one way every reader (layouts,
    the forwarder's split, salvage, dead letters) decodes a record, so the stored format
    can change in one place. Reads format 3 (`agent.buffer.record`: columnar, checked)
    and format 2 (the JSON array of samples) alike; the dicts have the format-2 shape
    (timestamps as their ISO 8601 text, NaN/±Inf as None). Raises ValueError for data
    that is not a record, or a record that fails its checksum (`CorruptRecord`)."""
    if is_record(data):
        return decode_samples(data)
    try:
        samples = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a record: {exc}") from exc
    if not isinstance(samples, list):
        raise ValueError("not a record: not a list of samples")
    return samples


def record_json(data: bytes) -> bytes:
    """The samples of a record as a JSON array (the format-2 bytes themselves for a
    format-2 record). Raises ValueError as `record_samples`."""
    if is_record(data):
        return orjson.dumps(decode_samples(data))
    return data


class GapList:
    """In-memory image of the gaps: merges contiguous ranges of the same reason (and
    epoch) and keeps at most GAPS_MAX of them. The SQLite buffer mirrors each change into
    its table."""

    def __init__(self, gaps: Sequence[Gap] = ()) -> None:
        self.gaps: list[Gap] = list(gaps)
        self.forgotten = 0

    def add(self, gap: Gap) -> tuple[bool, int]:
        """Add `gap`; returns (merged into the last one, how many oldest were forgotten)."""
        if self.gaps:
            last = self.gaps[-1]
            if (
                last.reason == gap.reason
                and last.epoch == gap.epoch
                and gap.first_seq == last.last_seq + 1
            ):
                self.gaps[-1] = Gap(
                    last.first_seq, gap.last_seq, last.count + gap.count, gap.reason, gap.epoch
                )
                return True, 0
        self.gaps.append(gap)
        extra = max(0, len(self.gaps) - GAPS_MAX)
        if extra:
            del self.gaps[:extra]
            self.forgotten += extra
        return False, extra

    def clear(self, through_seq: int) -> None:
        self.gaps = [g for g in self.gaps if g.last_seq > through_seq]


class DropEpisode:
    """Logs a run of drops once: WARNING when the first batch is dropped, INFO with the
    totals when an append fits again (log transitions, not repetitions)."""

    def __init__(self, policy: str, max_bytes: int, where: str, event: str = "buffer.full") -> None:
        self._event = event
        self._policy = policy
        self._max_bytes = max_bytes
        self._where = where
        self.active = False
        self._started = 0.0
        self._samples = 0
        self._records = 0

    def dropped(self, reason: str, records: int, samples: int, used_bytes: int) -> None:
        if not self.active:
            self.active = True
            self._started = time.monotonic()
            self._samples = 0
            self._records = 0
            log.warning(
                f"{self._event}.dropping",
                buffer=self._where,
                policy=self._policy,
                reason=reason,
                bytes=used_bytes,
                max_bytes=self._max_bytes,
            )
        self._samples += samples
        self._records += records

    def fitted(self, used_bytes: int) -> None:
        if self.active:
            self.active = False
            log.info(
                f"{self._event}.recovered",
                buffer=self._where,
                policy=self._policy,
                dropped_samples=self._samples,
                dropped_records=self._records,
                duration_s=round(time.monotonic() - self._started, 3),
                bytes=used_bytes,
                max_bytes=self._max_bytes,
            )


class Notifier:
    """Wakes every `wait()`er on append. One Event per generation: `notify` sets the
    current one and starts a new one, so no waiter can miss a wake-up between its check
    and its wait (there is no await between them) and nobody has to clear an Event that
    others still wait on."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


def open_buffer(config: BufferConfig) -> Buffer:
    """The buffer the config asks for, not opened yet: the caller awaits `open()`."""
    if config.kind == "memory":
        from agent.buffer.memory import MemoryBuffer

        return MemoryBuffer(config)
    from agent.buffer.sqlite import SqliteBuffer

    return SqliteBuffer(config)
