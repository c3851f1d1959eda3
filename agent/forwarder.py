"""Buffer → broker: take the oldest records, publish, delete only what was acknowledged.

Nothing leaves the disk before the broker acknowledged it. A record is committed
(deleted) only when every message carrying it was acknowledged; a record with any
failed message stays and is sent again, oldest first, on the next round. The
publisher never retransmits by itself, so duplicates are bounded by what was in flight
when a connection dropped.

The forwarder never waits for a PLC, and pollers never wait for the forwarder: a
broker outage only makes the buffer grow.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from agent.buffer import Buffer
from agent.payload import PayloadEncoder
from agent.poller import Backoff
from agent.publish import Publisher

log = structlog.get_logger()


@dataclass
class ForwarderStats:
    records_sent: int = 0
    samples_delivered: int = 0
    messages_failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    last_delivery: float | None = None  # epoch seconds
    last_latency_s: float | None = None  # append → acknowledged, of the newest record


class Forwarder:
    def __init__(
        self,
        buffer: Buffer,
        publisher: Publisher,
        encoder: PayloadEncoder,
        *,
        max_records: int = 100,
    ) -> None:
        self.buffer = buffer
        self.publisher = publisher
        self.encoder = encoder
        self.max_records = max_records
        self.stats = ForwarderStats()
        self._backoff = Backoff(0.5, 10.0)
        self._failing = False
        self._last_id = 0

    async def run(self) -> None:
        """Forward until cancelled."""
        while True:
            await self.publisher.wait_connected()
            if not await self.forward_once():
                await self.buffer.wait(self._last_id)

    async def forward_once(self) -> bool:
        """Send one round of records. Returns False when the buffer had nothing to send."""
        records = await self.buffer.take(self.max_records)
        if not records:
            return False
        messages = []
        owner: list[int] = []
        for i, record in enumerate(records):
            for message in self.encoder.encode(record):
                messages.append(message)
                owner.append(i)
        results = await self.publisher.publish(messages)
        failed_records: set[int] = set()
        for i, result in zip(owner, results, strict=True):
            if not result.ok:
                failed_records.add(i)
                reason = result.reason or "unknown"
                self.stats.messages_failed += 1
                self.stats.failures_by_reason[reason] = (
                    self.stats.failures_by_reason.get(reason, 0) + 1
                )
        delivered = [r for i, r in enumerate(records) if i not in failed_records]
        if delivered:
            await self.buffer.commit([r.id for r in delivered])
            now = time.time()
            self.stats.records_sent += len(delivered)
            self.stats.samples_delivered += sum(r.count for r in delivered)
            self.stats.last_delivery = now
            self.stats.last_latency_s = now - delivered[-1].created
        self._last_id = max(self._last_id, records[-1].id)
        if failed_records:
            first = next(results[j] for j, i in enumerate(owner) if i in failed_records)
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
