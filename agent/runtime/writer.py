"""The buffer writer: the one task that turns the pollers' readings into stored samples.

Pollers do not wait for the buffer: a poll's readings (and its ts_agent) go to a bounded
queue; the writer normalises them, taking their seqs, and stores them, several polls per
trip to the buffer's thread. Seqs are taken in the order the buffer gets them, so a batch
is never refused for an out-of-order seq, whatever order waiting pollers resume in. A
full queue makes the pollers wait (backpressure) rather than drop anything.

An append that raises (the buffer could not take the polls at all; not a ValueError,
which is the buffer refusing what it was given, counted like a refused batch) is tried again, in
order, with backoff, holding the polls in hand: the pollers wait behind the full queue
(backpressure, their skipped polls counted) and nothing that was given a seq is dropped.
While it fails the agent is not ready (`buffer not writable`); if it keeps failing for
the writer's stall deadline the supervisor stops the agent (exit 1). A batch the buffer
refused by itself (a per-batch error from `append_many`) is counted
(`samples_dropped_on_error`) and logged. An unexpected exception (a bug) counts the polls
in hand as dropped on error and is raised, so the supervisor logs it and restarts the
writer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from agent.buffer import Buffer
from agent.derive.stage import DeviceDerive
from agent.derive.state import DeriveState
from agent.normalize import Normalizer, Readings, SeqCounter
from agent.poller import ReadingSink
from agent.runtime.latest import LatestSamples
from agent.samples import PollSamples
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
    latest: LatestSamples
    derive: DeviceDerive | None = None


Write = tuple[DeviceSink, Readings, datetime]
#: Called after each store attempt: (device, samples, the error or None).
StoredHook = Callable[[str, int, Exception | None], None]
#: Called when an append raised and will be tried again (the error), and with None once
#: an append worked again.
RetryHook = Callable[[Exception | None], None]

#: Backoff of an append that raised: first and largest delay.
RETRY_MIN_S = 0.05
RETRY_MAX_S = 5.0


class _BatchAppender(Protocol):
    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]: ...


class BufferWriter:
    """`sink(...)` makes a device's ReadingSink; `run()` stores what the sinks hand over
    until `stop()` (then returns once everything handed over before is stored)."""

    def __init__(
        self,
        buffer: Buffer,
        on_stored: StoredHook,
        on_retry: RetryHook | None = None,
        derive_state: DeriveState | None = None,
    ) -> None:
        self.buffer = buffer
        #: The derive stage's durable state (saved after the stores that changed it).
        self.derive_state = derive_state if derive_state is not None else DeriveState(None)
        self._on_stored = on_stored
        self._on_retry = on_retry
        #: Appends that raised and were tried again, since start.
        self.retries = 0
        self._failing: str | None = None
        # Polls waiting for the writer; None tells the writer to stop (after the rest).
        self.queue: asyncio.Queue[Write | None] = asyncio.Queue(WRITE_QUEUE_MAX)
        #: Trips to the buffer finished (good or not): the writer's heartbeat.
        self.trips = 0
        self._derive_failed = False
        # device → its sink, for devices with time windows (see tick()).
        self._timed: dict[str, DeviceSink] = {}

    def sink(
        self,
        device: str,
        normalizer: Normalizer,
        seq: SeqCounter,
        derive: DeviceDerive | None = None,
    ) -> tuple[ReadingSink, LatestSamples]:
        """The sink a device's poller hands its readings to, and the device's newest
        published sample per tag (filled by the writer). `derive`: the device's derive
        stage (agent.derive), between the normaliser and the buffer."""
        target = DeviceSink(device, normalizer, seq, LatestSamples(), derive)
        queue = self.queue
        if derive is not None and derive.timed:
            self._timed[device] = target
        else:
            self._timed.pop(device, None)

        async def sink(readings: Readings) -> None:
            if readings:
                await queue.put((target, readings, datetime.now(UTC)))

        return sink, target.latest

    async def tick(self) -> None:
        """A clock tick for every device with time windows: closes the windows that are
        over even when the device is not read (down, or its window tags are in a slow
        group). Goes through the queue, so it is ordered with the polls."""
        now = datetime.now(UTC)
        for target in list(self._timed.values()):
            await self.queue.put((target, [], now))

    def forget(self, device: str, derive: DeviceDerive | None) -> None:
        """A device's derive stage stopped (the device was removed, or rebuilt by a
        reload, whose new sink is already registered): no more ticks for it."""
        target = self._timed.get(device)
        if target is not None and target.derive is derive:
            del self._timed[device]

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
            batch: list[tuple[str, Sequence[WireSample]]] = []
            derived: list[DeviceDerive] = []
            stored = False
            try:
                while item is not None:
                    target, readings, ts_agent = item
                    if target.derive is None:
                        samples: Sequence[WireSample]
                        try:
                            samples = target.normalizer.batch(readings, ts_agent, target.seq)
                        except Exception as exc:  # one device's bad data must not stop the rest
                            log.exception("normalize.failed", device=target.device)
                            self._on_stored(target.device, len(readings), exc)
                            samples = []
                        latest = target.latest
                        if type(samples) is PollSamples:
                            latest.put_poll(samples)
                        else:
                            for sample in samples:
                                latest.put(sample)
                        if samples:
                            batch.append((target.device, samples))
                    else:
                        for samples in self._derived(target, readings, ts_agent):
                            batch.append((target.device, samples))
                        derived.append(target.derive)
                    if len(batch) >= WRITE_BATCH_MAX or writes.empty():
                        break
                    item = writes.get_nowait()
                stopping = item is None
                if not batch:
                    await self._save_derive(derived)
                    continue
                if many is not None:
                    try:
                        errors: list[Exception | None] = await self._until_stored(
                            functools.partial(many.append_many, batch), len(batch)
                        )
                    except ValueError as exc:
                        errors = [exc] * len(batch)
                else:
                    errors = []
                    for dev, samples in batch:
                        try:
                            await self._until_stored(
                                functools.partial(buffer.append, dev, samples), len(samples)
                            )
                            errors.append(None)
                        except ValueError as exc:  # this batch refused: count it, go on
                            errors.append(exc)
                if len(errors) != len(batch):
                    raise RuntimeError(
                        f"the buffer returned {len(errors)} results for {len(batch)} batches"
                    )
                stored = True
                # The cycle state that made these records, before anything else is stored.
                await self._save_derive(derived)
                for (dev, samples), error in zip(batch, errors, strict=True):
                    self._on_stored(dev, len(samples), error)
            except Exception as exc:
                if not stored:
                    for dev, samples in batch:
                        self._on_stored(dev, len(samples), exc)
                raise
            finally:
                self.trips += 1

    def _derived(
        self, target: DeviceSink, readings: Readings, ts_agent: datetime
    ) -> list[list[WireSample]]:
        """A device with a derive stage: normalise, derive, then number what leaves."""
        derive = target.derive
        assert derive is not None
        try:
            samples = target.normalizer.samples(readings, ts_agent, SeqCounter(0))
        except Exception as exc:  # one device's bad data must not stop the rest
            log.exception("normalize.failed", device=target.device)
            self._on_stored(target.device, len(readings), exc)
            return []
        try:
            records = derive.process(samples, time.monotonic(), ts_agent)
        except Exception:
            # A bug in the stage: publish the poll as read rather than lose it.
            if not self._derive_failed:
                log.exception("derive.failed", device=target.device, note="published raw")
            self._derive_failed = True
            records = [samples]
        latest = target.latest
        seq = target.seq
        for record in records:
            first = seq.take(len(record))
            for i, sample in enumerate(record):
                sample["seq"] = first + i
                latest.put(sample)
        return records

    async def _save_derive(self, derived: list[DeviceDerive]) -> None:
        if not any(d.dirty for d in derived):
            return
        state = self.derive_state
        for d in derived:
            d.saved()
        if state.path is not None:
            await asyncio.to_thread(state.write, state.encode())

    async def _until_stored(self, append: Callable[[], Any], samples: int) -> Any:
        """Run `append` until it does not raise, with backoff; the outage is logged once."""
        delay = RETRY_MIN_S
        while True:
            try:
                result = await append()
            except ValueError:
                raise  # the buffer refuses what it was given (a contract breach): no retry
            except Exception as exc:
                self.retries += 1
                error = f"{type(exc).__name__}: {exc}"
                if self._failing is None:
                    log.error(
                        "buffer.append.retrying",
                        error=error,
                        samples=samples,
                        note="the polls in hand are kept and tried again; pollers wait",
                    )
                self._failing = error
                if self._on_retry is not None:
                    self._on_retry(exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            if self._failing is not None:
                log.info("buffer.append.recovered", retries=self.retries)
                self._failing = None
                if self._on_retry is not None:
                    self._on_retry(None)
            return result


__all__ = [
    "WRITE_BATCH_MAX",
    "WRITE_QUEUE_MAX",
    "BufferWriter",
    "DeviceSink",
    "RetryHook",
    "StoredHook",
]
