"""The buffer writer: the one task that turns the pollers' readings into stored samples.

Pollers do not wait for the buffer: a poll's readings (and its ts_agent) go to a bounded
queue; the writer normalises them, taking their seqs, and stores them, several polls per
trip to the buffer's thread. Seqs are taken in the order the buffer gets them, so a batch
is never refused for an out-of-order seq, whatever order waiting pollers resume in. A
full queue makes the pollers wait (backpressure) rather than drop anything.

A failed append is counted (`samples_dropped_on_error`) and logged, never raised. An
unexpected exception (a bug) counts the polls in hand as dropped on error and is raised,
so the supervisor logs it and restarts the writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from agent.buffer import Buffer
from agent.normalize import Normalizer, Readings, SeqCounter
from agent.poller import ReadingSink
from agent.schema import WireSample

log = structlog.get_logger()

#: Polls handed over to the buffer writer but not stored yet (backpressure beyond).
WRITE_QUEUE_MAX = 64
#: At most this many polls go to the buffer's thread in one trip.
WRITE_BATCH_MAX = 32


@dataclass(slots=True)
class DeviceSink:
    """What the writer needs to turn one device's readings into stored samples."""

    device: str
    normalizer: Normalizer
    seq: SeqCounter
    latest: dict[str, WireSample]


Write = tuple[DeviceSink, Readings, datetime]
#: Called after each store attempt: (device, samples, the error or None).
StoredHook = Callable[[str, int, Exception | None], None]


class _BatchAppender(Protocol):
    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]: ...


class BufferWriter:
    """`sink(...)` makes a device's ReadingSink; `run()` stores what the sinks hand over
    until `stop()` (then returns once everything handed over before is stored)."""

    def __init__(self, buffer: Buffer, on_stored: StoredHook) -> None:
        self.buffer = buffer
        self._on_stored = on_stored
        # Polls waiting for the writer; None tells the writer to stop (after the rest).
        self.queue: asyncio.Queue[Write | None] = asyncio.Queue(WRITE_QUEUE_MAX)
        #: Trips to the buffer finished (good or not): the writer's heartbeat.
        self.trips = 0

    def sink(
        self, device: str, normalizer: Normalizer, seq: SeqCounter
    ) -> tuple[ReadingSink, dict[str, WireSample]]:
        """The sink a device's poller hands its readings to, and the device's newest
        sample per tag (filled by the writer)."""
        target = DeviceSink(device, normalizer, seq, {})
        queue = self.queue

        async def sink(readings: Readings) -> None:
            if readings:
                await queue.put((target, readings, datetime.now(UTC)))

        return sink, target.latest

    async def stop(self) -> None:
        """Tell `run()` to return once what was handed over before is stored."""
        await self.queue.put(None)

    def busy(self) -> bool:
        return not self.queue.empty()

    async def run(self) -> None:
        writes = self.queue
        buffer = self.buffer
        many: _BatchAppender | None = (
            buffer if callable(getattr(buffer, "append_many", None)) else None  # type: ignore[assignment]
        )
        stopping = False
        while not stopping:
            item = await writes.get()
            batch: list[tuple[str, list[WireSample]]] = []
            stored = False
            try:
                while item is not None:
                    target, readings, ts_agent = item
                    try:
                        samples = target.normalizer.samples(readings, ts_agent, target.seq)
                    except Exception as exc:  # one device's bad data must not stop the rest
                        log.exception("normalize.failed", device=target.device)
                        self._on_stored(target.device, len(readings), exc)
                        samples = []
                    latest = target.latest
                    for sample in samples:
                        latest[sample["tag"]] = sample
                    if samples:
                        batch.append((target.device, samples))
                    if len(batch) >= WRITE_BATCH_MAX or writes.empty():
                        break
                    item = writes.get_nowait()
                stopping = item is None
                if not batch:
                    continue
                if many is not None:
                    try:
                        errors: list[Exception | None] = await many.append_many(batch)
                    except Exception as exc:
                        errors = [exc] * len(batch)
                else:
                    errors = []
                    for dev, samples in batch:
                        try:
                            await buffer.append(dev, samples)
                            errors.append(None)
                        except Exception as exc:
                            errors.append(exc)
                if len(errors) != len(batch):
                    raise RuntimeError(
                        f"the buffer returned {len(errors)} results for {len(batch)} batches"
                    )
                stored = True
                for (dev, samples), error in zip(batch, errors, strict=True):
                    self._on_stored(dev, len(samples), error)
            except Exception as exc:
                if not stored:
                    for dev, samples in batch:
                        self._on_stored(dev, len(samples), exc)
                raise
            finally:
                self.trips += 1


__all__ = ["WRITE_BATCH_MAX", "WRITE_QUEUE_MAX", "BufferWriter", "DeviceSink", "StoredHook"]
