"""Buffer → broker: take the oldest records, publish, delete only what was acknowledged.

Nothing leaves the disk before the broker acknowledged it. A record is committed
(deleted) only when every message carrying it was acknowledged; a record with any
failed message stays and is sent again, oldest first, on the next round. The
publisher never retransmits by itself, so duplicates are bounded by what was in flight
when a connection dropped.

The forwarder never waits for a PLC, and pollers never wait for the forwarder: a
broker outage only makes the buffer grow.

Live data and backlog share one link and one queue: records go out oldest first, so after
an outage the backlog drains before live data, at the publisher's full rate (in-flight
window of QoS 1 messages), while pollers keep appending behind it. Records that predate
the current connection, or were attempted before, are marked historical (agent.payload).

Refusals: a PUBACK reason >= 0x80 is counted per record; after `max_refusals` the record is
moved to the dead-letter store and deleted from the buffer, so one refused record cannot
hold the others back for ever. A lost connection is not a refusal and never counts.

Gap notices: seq ranges the buffer dropped ride on the first message of the next round
and are cleared from the buffer once that message was acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.buffer import Buffer, Gap, Record
from agent.payload import PayloadEncoder
from agent.poller import Backoff
from agent.publish import Message, Publisher, PublishResult
from agent.publish.deadletter import DeadLetters

log = structlog.get_logger()


@dataclass
class ForwarderStats:
    records_sent: int = 0
    samples_delivered: int = 0
    messages_failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    last_delivery: float | None = None  # epoch seconds
    last_latency_s: float | None = None  # append → acknowledged, of the newest record
    refusals: int = 0  # messages the broker refused (PUBACK reason >= 0x80)
    refusals_by_reason: dict[str, int] = field(default_factory=dict)
    dead_lettered_records: int = 0
    dead_lettered_samples: int = 0
    historical_records: int = 0  # records sent marked historical (each attempt)
    gap_notices_delivered: int = 0


class Forwarder:
    def __init__(
        self,
        buffer: Buffer,
        publisher: Publisher,
        encoder: PayloadEncoder,
        *,
        max_records: int = 100,
        dead_letters: DeadLetters | None = None,
        max_refusals: int = 5,
    ) -> None:
        self.buffer = buffer
        self.dead_letters = dead_letters or DeadLetters(None)
        self.max_refusals = max_refusals
        self._refusals: dict[int, int] = {}  # record id → refusals so far
        self._attempted: set[int] = set()  # record ids with a failed attempt
        self._gaps: list[Gap] = []
        self._gaps_dropped_seen: int | None = None
        self.publisher = publisher
        self.encoder = encoder
        self.max_records = max_records
        self.stats = ForwarderStats()
        self._backoff = Backoff(0.5, 10.0)
        self._failing = False
        self._last_id = 0
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Forward until `request_stop()` (returns after the round in progress, so
        nothing acknowledged is left uncommitted and sent twice) or cancellation."""
        while not self._stopping.is_set():
            if not await self._unless_stopping(self.publisher.wait_connected()):
                return
            if not await self.forward_once():
                await self._unless_stopping(self.buffer.wait(self._last_id))

    def request_stop(self) -> None:
        """Finish the round in progress, then return from run()."""
        self._stopping.set()

    async def _unless_stopping(self, waiting: Coroutine[Any, Any, None]) -> bool:
        """Wait for `waiting`, or until a stop is requested (then False)."""
        task = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stop):
                t.cancel()
            await asyncio.wait({task, stop})
        return not self._stopping.is_set()

    async def forward_once(self) -> bool:
        """Send one round of records. Returns False when the buffer had nothing to send."""
        records = await self.buffer.take(self.max_records)
        if not records:
            return False
        first_id = records[0].id
        self._attempted = {i for i in self._attempted if i >= first_id}
        self._refusals = {i: n for i, n in self._refusals.items() if i >= first_id}
        gaps = await self._pending_gaps()
        since = self.publisher.connected_since
        messages: list[Message] = []
        owner: list[int] = []
        for i, record in enumerate(records):
            historical = record.id in self._attempted or (
                since is not None and record.created < since
            )
            self.stats.historical_records += historical
            encoded = self.encoder.encode(
                record, historical=historical, gaps=gaps if i == 0 else ()
            )
            for message in encoded:
                messages.append(message)
                owner.append(i)
        results = await self.publisher.publish(messages)
        failed_records: dict[int, PublishResult] = {}
        for i, result in zip(owner, results, strict=True):
            if not result.ok:
                failed_records.setdefault(i, result)
                reason = result.reason or "unknown"
                self.stats.messages_failed += 1
                self.stats.failures_by_reason[reason] = (
                    self.stats.failures_by_reason.get(reason, 0) + 1
                )
                if _refused(result):
                    self.stats.refusals += 1
                    self.stats.refusals_by_reason[reason] = (
                        self.stats.refusals_by_reason.get(reason, 0) + 1
                    )
        if gaps and 0 not in failed_records:
            await self.buffer.clear_gaps(max(g.last_seq for g in gaps))
            self.stats.gap_notices_delivered += 1
            self._gaps = []
        dead = await self._dead_letter(records, failed_records)
        delivered = [r for i, r in enumerate(records) if i not in failed_records]
        for i in failed_records:
            self._attempted.add(records[i].id)
        if delivered or dead:
            await self.buffer.commit([r.id for r in delivered] + dead)
        if delivered:
            now = time.time()
            self.stats.records_sent += len(delivered)
            self.stats.samples_delivered += sum(r.count for r in delivered)
            self.stats.last_delivery = now
            self.stats.last_latency_s = now - delivered[-1].created
        self._last_id = max(self._last_id, records[-1].id)
        for record_id in dead:
            failed_records = {i: r for i, r in failed_records.items() if records[i].id != record_id}
        if failed_records:
            first = failed_records[min(failed_records)]
            if not self._failing:
                # A refusal by the broker (reason code >= 0x80) needs an operator; a lost
                # connection is the publisher's to report and heals by itself.
                level = "error" if first.code is not None and first.code >= 0x80 else "warning"
                getattr(log, level)(
                    "forward.failed",
                    reason=first.reason,
                    code=first.code,
                    records=len(failed_records),
                    note="kept in the buffer, will be sent again",
                )
                self._failing = True
            await asyncio.sleep(self._backoff.next())
        elif self._failing:
            log.info("forward.recovered")
            self._failing = False
            self._backoff.reset()
        return True

    async def _pending_gaps(self) -> list[Gap]:
        """The buffer's gaps, re-read only when it dropped something since last time."""
        dropped = self.buffer.stats().dropped_samples
        if dropped != self._gaps_dropped_seen:
            self._gaps_dropped_seen = dropped
            self._gaps = await self.buffer.take_gaps()
        return self._gaps

    async def _dead_letter(
        self, records: list[Record], failed: dict[int, PublishResult]
    ) -> list[int]:
        """Count refusals; move records refused max_refusals times to the dead letters.
        Returns their ids (to delete from the buffer)."""
        dead: list[int] = []
        for i, result in failed.items():
            if not _refused(result):
                continue
            record = records[i]
            tries = self._refusals.get(record.id, 0) + 1
            self._refusals[record.id] = tries
            if tries < self.max_refusals:
                continue
            reason = result.reason or "refused"
            await self.dead_letters.add(record, reason, result.code, tries)
            self._refusals.pop(record.id, None)
            self.stats.dead_lettered_records += 1
            self.stats.dead_lettered_samples += record.count
            log.error(
                "forward.dead_letter",
                device=record.device,
                first_seq=record.first_seq,
                last_seq=record.last_seq,
                samples=record.count,
                reason=reason,
                code=result.code,
                tries=tries,
                store=self.dead_letters.path or "memory",
            )
            dead.append(record.id)
        return dead

    async def drain(self, grace_s: float) -> int:
        """At shutdown: keep forwarding until the buffer is empty, the publisher is not
        connected, or grace_s has passed. Returns the records still waiting."""
        deadline = time.monotonic() + grace_s
        try:
            async with asyncio.timeout(grace_s):
                while self.publisher.connected and time.monotonic() < deadline:
                    if not await self.forward_once():
                        break
        except TimeoutError:
            pass
        return self.buffer.stats().records


def _refused(result: PublishResult) -> bool:
    """The broker answered and said no (PUBACK reason >= 0x80), as opposed to a lost
    connection or a timeout, which heal by themselves."""
    return result.code is not None and result.code >= 0x80
