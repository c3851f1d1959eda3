"""Buffer → broker: take the oldest records, publish, delete only what was acknowledged.

Nothing leaves the disk before the broker acknowledged it or it was moved to the
dead-letter store. A record is committed (deleted) only when every message carrying it
was acknowledged; a record with a failed message stays and is sent again. The publisher
never retransmits by itself, so duplicates are bounded by what was in flight when a
connection dropped.

The forwarder never waits for a PLC, and pollers never wait for the forwarder: a
broker outage only makes the buffer grow.

Live data and backlog share one link and one queue: records go out oldest first, so after
an outage the backlog drains before live data, at the publisher's full rate (in-flight
window of QoS 1 messages), while pollers keep appending behind it. Records that predate
the current connection, or were attempted before, are marked historical (agent.payload).

Records that cannot be published as they are (docs/mqtt.md, "Poison records"):

- **Too large.** Every message fits the packet limit (`agent.publish.limits`:
  `max_message_bytes`, else the broker's CONNACK Maximum Packet Size, else 128 KiB; the
  broker's announced limit always applies): a record whose message would exceed it is
  split into as many sub-records as its size asks for (consecutive slices of its samples,
  split again if one still does not fit), each published as its own message with exact
  first_seq/last_seq/count. The record is committed once every part was acknowledged. A
  single sample that still does not fit is dead-lettered alone. Messages a layout needs
  before a record's data (layout compact's metadata) come from `encoder.preamble` once
  per record and are part of it: the record is committed only when they were
  acknowledged too.
- **Cannot be encoded.** The encoder raises (or returns something that is not a list of
  messages): the record is split the same way until only the samples it fails on are
  left; those are dead-lettered at once, the others are sent.
- **Permanent.** paho rejects the message (a topic with ``+``/``#``), or the broker
  refuses it with a reason that will not change by itself (0x87 Not authorized, 0x90
  Topic name invalid, 0x99 Payload format invalid): dead-lettered at once. When only some
  of a record's messages are refused so (layout tag: one tag's topic), it is sent again
  one part per sample, so that only the refused samples are dead-lettered.
- **Transient refusal** (any other PUBACK reason >= 0x80, e.g. 0x97 Quota exceeded): the
  *device* backs off (exponential, with jitter); after `max_refusals` refusals of the same
  record it is dead-lettered. While a device backs off its records wait in the buffer and
  every other device's records flow at full rate; when its backoff ends only its oldest
  record is sent (a probe), the rest follow once that one was delivered or set aside. So
  no later record of that device overtakes the refused one, except those that were in
  flight beside it in the round of the first refusal (kept as delivered).
- **A lost connection or a timeout** is nobody's fault in particular: nothing is counted
  against a record; the round backs off as a whole and waits for the publisher.

Every dead letter is counted by reason, logged once per device and reason
(``forward.dead_letter``, ERROR) and announced to consumers as a gap with reason
``dead_letter`` in the next message, like the buffer's own gaps; the announcement is
repeated (also across restarts, the store keeps the flag) until a message carrying it was
acknowledged. Entries an operator queued for replay (``edge-agent deadletter replay``) are
picked up within `replay_check_s` and published with their original seqs, marked
historical.

**Merging** (`merge_records`, on where the publisher paces publishes, e.g. AWS IoT Core's
100 per second): a device's records of one round go out as one message, within the
packet limit, instead of one message each; the buffer records behind it are committed
together once it was acknowledged.

Gap notices: seq ranges the buffer dropped ride on the first message of the next round
and are cleared from the buffer once that message was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.buffer import Buffer, Gap, Record
from agent.buffer.common import record_samples
from agent.buffer.record import encode_samples
from agent.payload import PayloadEncoder
from agent.poller import Backoff
from agent.publish import (
    PACKET_TOO_LARGE,
    PERMANENT_CODES,
    Message,
    Publisher,
    PublishResult,
    packet_size,
)
from agent.publish.deadletter import DeadLetters, DeadLetterStats
from agent.publish.limits import effective_max_message_bytes

log = structlog.get_logger()

#: Gap reason for samples moved to the dead-letter store.
DEAD_LETTER_GAP = "dead_letter"
#: How often the forwarder looks for dead letters queued for replay.
REPLAY_CHECK_S = 2.0
_REPLAY_BATCH = 100
_STORE_FAILED = PublishResult(False, "dead-letter store failed")


#: merge_records without a packet limit: a merged record's data stays below this.
MERGE_MAX_BYTES = 64_000
#: Left for the message's envelope (topic, device head, gap notices) under the limit.
MERGE_MARGIN_BYTES = 4_096


@dataclass
class DeviceBackoff:
    """A device whose records wait because the broker refused one (transiently)."""

    reason: str
    code: int | None
    refusals: int  # of the record at the head of the device's queue
    retry_at: float  # epoch seconds


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
    dead_lettered_by_reason: dict[str, int] = field(default_factory=dict)  # records
    split_records: int = 0  # records sent as several parts to fit the packet size
    split_parts: int = 0
    merged_records: int = 0  # records sent inside a merged one (merge_records)
    replayed_records: int = 0  # dead letters delivered after `deadletter replay`
    replayed_samples: int = 0
    historical_records: int = 0  # records sent marked historical (each attempt)
    gap_notices_delivered: int = 0
    #: device → its backoff, while the broker's refusals hold that device back.
    backing_off: dict[str, DeviceBackoff] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PoisonSnapshot:
    """What the status page, /api/status and metrics show about records set aside: a
    copy, safe to read from the HTTP layer while the forwarder runs."""

    dead_lettered_records: int
    dead_lettered_samples: int
    dead_lettered_by_reason: dict[str, int]
    split_records: int
    split_parts: int
    replayed_records: int
    replayed_samples: int
    #: device → (reason, code, refusals, seconds until its next attempt)
    backing_off: dict[str, tuple[str, int | None, int, float]]
    store: DeadLetterStats
    store_path: str | None


class _Poison(Exception):
    """A record that cannot be published as it is."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass
class _Part:
    index: int  # of the record in the round
    record: Record  # the record itself, or a sub-record of it
    messages: list[Message]
    poison: _Poison | None = None  # set: this (sub-)record cannot be sent, no messages


class Forwarder:
    """max_message_bytes: `mqtt.max_message_bytes` (None: the broker's announced limit,
    else platform_message_bytes, else 128 KiB; see agent.publish.limits).
    platform_message_bytes: the message limit of the broker profile's platform, if any
    (agent.publish.cloud.message_limit).

    merge_records: send a device's records of one round as one message (within the
    packet limit) instead of one message per record — for a publish-rate limit (AWS IoT
    Core), where more messages would only queue up and the buffer would fill."""

    def __init__(
        self,
        buffer: Buffer,
        publisher: Publisher,
        encoder: PayloadEncoder,
        *,
        max_records: int = 100,
        dead_letters: DeadLetters | None = None,
        max_refusals: int = 5,
        max_message_bytes: int | None = None,
        platform_message_bytes: int | None = None,
        merge_records: bool = False,
        device_backoff_min_s: float = 0.5,
        device_backoff_max_s: float = 30.0,
        replay_check_s: float = REPLAY_CHECK_S,
    ) -> None:
        self.buffer = buffer
        self.dead_letters = dead_letters if dead_letters is not None else DeadLetters(None)
        self.max_refusals = max_refusals
        self.max_message_bytes = max_message_bytes
        self.platform_message_bytes = platform_message_bytes
        self._session: float | None = None  # connected_since the encoder last heard of
        self.merge_records = merge_records
        self._members: dict[int, list[int]] = {}  # merged record id → buffer record ids
        self.device_backoff_min_s = device_backoff_min_s
        self.device_backoff_max_s = device_backoff_max_s
        self.replay_check_s = replay_check_s
        self._refusals: dict[int, int] = {}  # record id → refusals so far
        self._attempted: set[int] = set()  # record ids with a failed attempt
        self._split_limit: dict[int, int] = {}  # record id → packet limit learnt from 0x95
        # Records sent as one part per sample, to find which samples the broker refuses
        # (set when some of a record's messages were refused for good and others not).
        self._singles: set[int] = set()
        self._gaps: list[Gap] = []
        self._gaps_dropped_seen: int | None = None
        # Dead letters not yet announced, folded into one gap per device (None: not yet
        # loaded from the store), and the highest dead-letter id they cover.
        self._dead_pending: dict[str, Gap] | None = None
        self._dead_max_id = 0
        self._logged: set[tuple[str, str]] = set()  # (device, reason) dead letters logged
        self._backoff_logged: set[str] = set()  # devices whose backoff episode was logged
        self._round_dead: set[str] = set()  # devices with a dead letter in this round
        self.publisher = publisher
        self.encoder = encoder
        self.max_records = max_records
        self.stats = ForwarderStats()
        self._backoff = Backoff(0.5, 10.0)  # the whole round: lost connection, timeouts
        self._failing = False
        self._last_id = 0
        self._next_replay_check = 0.0
        self._rng = random.Random()
        self._stopping = asyncio.Event()
        #: time.monotonic() of the loop's last turn; run() turns at least every
        #: replay_check_s (plus one round), so a stale heartbeat means a stuck forwarder.
        self.heartbeat = time.monotonic()

    def poison_snapshot(self) -> PoisonSnapshot:
        """Dead letters, splits and per-device backoff, as plain values (no I/O)."""
        st = self.stats
        now = time.time()
        return PoisonSnapshot(
            dead_lettered_records=st.dead_lettered_records,
            dead_lettered_samples=st.dead_lettered_samples,
            dead_lettered_by_reason=dict(st.dead_lettered_by_reason),
            split_records=st.split_records,
            split_parts=st.split_parts,
            replayed_records=st.replayed_records,
            replayed_samples=st.replayed_samples,
            backing_off={
                d: (b.reason, b.code, b.refusals, max(0.0, round(b.retry_at - now, 3)))
                for d, b in st.backing_off.items()
            },
            store=self.dead_letters.stats(),
            store_path=self.dead_letters.path,
        )

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Forward until `request_stop()` (returns after the round in progress, so
        nothing acknowledged is left uncommitted and sent twice) or cancellation."""
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            if not self.publisher.connected:
                await self._unless_stopping(self._wait_connected())
                continue
            await self._replay_if_due()
            if not await self.forward_once():
                await self._unless_stopping(self._idle())

    async def _wait_connected(self) -> None:
        """Wait for the publisher, at most replay_check_s (so the heartbeat stays fresh)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.replay_check_s):
                await self.publisher.wait_connected()

    def request_stop(self) -> None:
        """Finish the round in progress, then return from run()."""
        self._stopping.set()

    async def _idle(self) -> None:
        """Wait for a new record, a device's backoff to end, or the next replay check."""
        now = time.time()
        timeout = max(0.0, self._next_replay_check - time.monotonic())
        for state in self.stats.backing_off.values():
            timeout = min(timeout, max(0.0, state.retry_at - now))
        try:
            async with asyncio.timeout(timeout):
                await self.buffer.wait(self._last_id)
        except TimeoutError:
            # Records of devices that were backing off are due again: scan from the start.
            self._last_id = 0

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

    # ------------------------------------------------------------------ one round

    async def _take(self) -> list[Record]:
        """The oldest records of devices that are not backing off (at most max_records).
        Pages past the records of devices that are; remembers the last id looked at."""
        now = time.time()
        probing: set[str] = set()
        for device, state in list(self.stats.backing_off.items()):
            if state.retry_at <= now:
                # Due again: only its head record goes out in this round (a probe), so
                # none of its later records can overtake it if it is refused again. If
                # the device has no records left, nothing waits for it.
                del self.stats.backing_off[device]
                probing.add(device)
        blocked = set(self.stats.backing_off)
        out: list[Record] = []
        after = 0
        while len(out) < self.max_records:
            page = await self.buffer.take(self.max_records, after)
            if not page:
                break
            for record in page:
                if record.device not in blocked:
                    out.append(record)
                    if record.device in probing:
                        blocked.add(record.device)
                    if len(out) == self.max_records:
                        after = record.id
                        break
                after = record.id
            if len(page) < self.max_records:
                break
        self._last_id = max(self._last_id, after)
        return out

    def _limit(self) -> int:
        broker = getattr(self.publisher, "max_packet_size", None)
        return effective_max_message_bytes(
            self.max_message_bytes,
            broker if isinstance(broker, int) and broker > 0 else None,
            platform_bytes=self.platform_message_bytes,
        )

    def _check_session(self) -> float | None:
        """The current connection's start; tells the encoder when it is a new one (its
        metadata must be published again on it)."""
        since = self.publisher.connected_since
        if since != self._session:
            self._session = since
            self.encoder.new_session()
        return since

    def _preamble(self, record: Record, limit: int | None) -> list[Message]:
        """What the layout must publish before this record's data (compact metadata)."""
        try:
            pre = self.encoder.preamble(record, limit=limit)
        except Exception as exc:  # a record it cannot read: encoding fails the same way
            raise _Poison(f"cannot encode: {type(exc).__name__}: {exc}") from None
        for m in pre:
            if limit is not None and packet_size(m) > limit:
                self.encoder.unannounce(record.device)
                raise _Poison(
                    f"too large: a metadata message needs {packet_size(m)} bytes, the limit "
                    f"is {limit}",
                    PACKET_TOO_LARGE,
                )
        return pre

    async def forward_once(self) -> bool:
        """Send one round of records. Returns False when there was nothing to send."""
        records = await self._take()
        if not records:
            return False
        first_id = records[0].id
        self._attempted = {i for i in self._attempted if i >= first_id}
        self._refusals = {i: n for i, n in self._refusals.items() if i >= first_id}
        self._split_limit = {i: n for i, n in self._split_limit.items() if i >= first_id}
        self._singles = {i for i in self._singles if i >= first_id}
        self._members = {}
        if self.merge_records:
            records = self._merge(records, self._limit())
        buffer_gaps = await self._pending_gaps()
        dead_gaps = await self._pending_dead_gaps()
        dead_through = self._dead_max_id
        gaps = [*buffer_gaps, *dead_gaps]
        since = self._check_session()
        limit = self._limit()
        parts: list[_Part] = []
        poison: dict[int, _Poison] = {}
        bad_parts: dict[int, list[_Part]] = {}  # record index → its parts that cannot go
        gaps_at: int | None = None  # index of the part whose first message carries gaps
        for i, record in enumerate(records):
            historical = record.id in self._attempted or (
                since is not None and record.created < since
            )
            self.stats.historical_records += historical
            carry = gaps if gaps and gaps_at is None else []
            learnt = self._split_limit.get(record.id)
            record_limit = learnt if limit is None else min(limit, learnt or limit)
            try:
                pre = self._preamble(record, record_limit)
                if record.id in self._singles:
                    encoded = self._encode_singles(record, historical, carry, record_limit)
                else:
                    encoded = self._encode_fitting(record, historical, carry, record_limit)
            except _Poison as exc:  # not even splittable
                self.encoder.unannounce(record.device)
                poison[i] = exc
                continue
            sendable = [p for p in encoded if p.poison is None]
            unsendable = [p for p in encoded if p.poison is not None]
            if len(encoded) == 1 and encoded[0].poison is not None:
                self.encoder.unannounce(record.device)
                poison[i] = encoded[0].poison
                continue
            if unsendable:
                bad_parts[i] = unsendable
            if pre:
                parts.append(_Part(i, record, pre))
            if carry and sendable and sendable[0].messages:
                gaps_at = len(parts)
            if len(encoded) > 1:
                self.stats.split_records += 1
                self.stats.split_parts += len(encoded)
            parts.extend(_Part(i, p.record, p.messages) for p in sendable)

        messages = [m for p in parts for m in p.messages]
        results = await self.publisher.publish(messages) if messages else []
        if len(results) != len(messages):
            raise RuntimeError(
                f"publisher returned {len(results)} results for {len(messages)} messages"
            )
        failed: dict[int, tuple[PublishResult, Message]] = {}  # record index → first failure
        at = 0
        gaps_delivered = False
        some_ok: set[int] = set()  # record indexes with at least one message acked
        for n, part in enumerate(parts):
            part_failure: tuple[PublishResult, Message] | None = None
            for message, result in zip(
                part.messages, results[at : at + len(part.messages)], strict=True
            ):
                if result.ok:
                    some_ok.add(part.index)
                else:
                    self._count_failure(result)
                    part_failure = part_failure or (result, message)
            if part_failure is not None:
                if records[part.index].id in self._singles and _permanent(part_failure[0]):
                    # Sent alone: exactly this sample is refused for good.
                    result = part_failure[0]
                    bad_parts.setdefault(part.index, []).append(
                        _Part(
                            part.index,
                            part.record,
                            [],
                            _Poison(result.reason or "refused", result.code),
                        )
                    )
                else:
                    failed.setdefault(part.index, part_failure)
            if n == gaps_at and results[at].ok:
                gaps_delivered = True
            at += len(part.messages)
        for i, unsendable_parts in list(bad_parts.items()):
            if records[i].id in self._singles and i not in some_ok and i not in failed:
                # Sent one part per sample and every one refused: one dead letter.
                poison[i] = unsendable_parts[0].poison or _Poison("refused")
                del bad_parts[i]
        if gaps_delivered:
            if buffer_gaps:
                await self.buffer.clear_gaps(max(g.last_seq for g in buffer_gaps))
            if dead_gaps:
                # Dead letters of this round are added below, after this: all pending
                # ones were in the notice.
                await self.dead_letters.mark_announced_through(dead_through)
                self._dead_pending = {}
            self._gaps = []
            self.stats.gap_notices_delivered += 1

        dead: list[int] = []
        lost_connection: PublishResult | None = None
        now = time.time()
        refused_devices: dict[str, tuple[PublishResult, int]] = {}
        kept: set[int] = set()  # records whose set-aside parts could not be stored
        set_aside = 0  # samples of delivered records that went to the dead letters instead
        for i, bad_list in sorted(bad_parts.items()):
            if i in failed:
                continue  # the whole record is sent again; its parts are re-derived then
            for part in bad_list:
                assert part.poison is not None
                if not await self._dead_letter(
                    part.record, part.poison.reason, part.poison.code, 1
                ):
                    kept.add(i)
                    refused_devices.setdefault(records[i].device, (_STORE_FAILED, 1))
                    break
                set_aside += part.record.count
        for i in failed:
            # Its metadata (layout compact) may be what failed: sent again with it.
            self.encoder.unannounce(records[i].device)
        for i in sorted(poison.keys() | failed.keys()):
            record = records[i]
            bad = poison.get(i)
            if bad is not None:
                if await self._dead_letter(record, bad.reason, bad.code, 1):
                    dead.append(record.id)
                else:
                    refused_devices.setdefault(record.device, (_STORE_FAILED, 1))
                continue
            result, message = failed[i]
            verdict = self._verdict(record, result, message)
            if (
                verdict == "dead"
                and record.count > 1
                and i in some_ok
                and record.id not in self._singles
            ):
                # Some of its messages went, some were refused for good (e.g. an ACL on
                # one tag's topic): find out which samples, one part per sample.
                self._singles.add(record.id)
                verdict = "split"
            if verdict == "dead":
                tries = self._refusals.get(record.id, 0) + 1
                reason = result.reason or "refused"
                if await self._dead_letter(record, reason, result.code, tries):
                    dead.append(record.id)
                else:
                    refused_devices.setdefault(record.device, (_STORE_FAILED, tries))
            elif verdict == "split":
                continue  # sent again at once, in smaller parts
            elif verdict == "refused":
                tries = self._refusals.get(record.id, 0) + 1
                self._refusals[record.id] = tries
                reason = result.reason or "refused"
                if tries >= self.max_refusals and await self._dead_letter(
                    record, reason, result.code, tries
                ):
                    dead.append(record.id)
                else:
                    refused_devices.setdefault(record.device, (result, tries))
            else:
                lost_connection = lost_connection or result
            self._attempted.add(record.id)

        delivered = [
            r
            for i, r in enumerate(records)
            if i not in failed and i not in poison and i not in kept
        ]
        if delivered or dead:
            await self.buffer.commit(self._ids([r.id for r in delivered] + dead))
        if delivered:
            self.stats.records_sent += len(self._ids([r.id for r in delivered]))
            self.stats.samples_delivered += sum(r.count for r in delivered) - set_aside
            self.stats.last_delivery = now
            self.stats.last_latency_s = now - delivered[-1].created
        for device in {r.device for r in delivered} - refused_devices.keys() - self._round_dead:
            self._device_recovered(device)
        self._round_dead.clear()
        for device, (result, tries) in refused_devices.items():
            self._device_backs_off(device, result, tries, now)
        if refused_devices or dead:
            # Records skipped behind a backing-off device are looked at again next time.
            self._last_id = 0

        if lost_connection is not None:
            if not self._failing:
                log.warning(
                    "forward.failed",
                    reason=lost_connection.reason,
                    code=lost_connection.code,
                    records=sum(
                        1 for i, (r, _m) in failed.items() if self._is_connection_failure(r)
                    ),
                    note="kept in the buffer, will be sent again",
                )
                self._failing = True
            await asyncio.sleep(self._backoff.next())
        elif self._failing:
            log.info("forward.recovered")
            self._failing = False
            self._backoff.reset()
        return True

    # ------------------------------------------------------------------ merging

    def _ids(self, ids: list[int]) -> list[int]:
        """Buffer record ids behind the round's (possibly merged) record ids."""
        return [m for i in ids for m in self._members.get(i, (i,))]

    def _merge(self, records: list[Record], limit: int | None) -> list[Record]:
        """merge_records: a device's records of this round become one record (one
        message) as long as it stays within `limit` (default MERGE_MAX_BYTES), so a
        publish-rate limit costs latency, not data. Records with a history (refused,
        split, sent one sample at a time) and records that do not decode stay alone; a
        merged record takes the first one's id (its members are committed together)."""
        budget = (limit or MERGE_MAX_BYTES) - MERGE_MARGIN_BYTES
        groups: list[list[Record]] = []
        sizes: list[int] = []
        open_group: dict[tuple[str, str], int] = {}  # (device, epoch) → index in groups
        special = self._singles | self._split_limit.keys() | self._refusals.keys()
        for record in records:
            key = (record.device, record.epoch)
            at = open_group.get(key)
            if record.id in special:
                groups.append([record])
                sizes.append(len(record.data))
                continue
            if at is not None and sizes[at] + len(record.data) <= budget:
                groups[at].append(record)
                sizes[at] += len(record.data)
                continue
            open_group[key] = len(groups)
            groups.append([record])
            sizes.append(len(record.data))
        out: list[Record] = []
        for group in groups:
            if len(group) == 1:
                out.append(group[0])
                continue
            try:
                samples = [s for r in group for s in record_samples(r.data)]
            except (ValueError, TypeError):
                out.extend(group)  # one of them is damaged: each goes its own way
                continue
            merged = _sub(group[0], samples)
            merged = Record(
                id=merged.id,
                device=merged.device,
                first_seq=group[0].first_seq,
                last_seq=group[-1].last_seq,
                count=sum(r.count for r in group),
                created=group[0].created,
                data=merged.data,
                epoch=group[0].epoch,
            )
            self._members[merged.id] = [r.id for r in group]
            if any(r.id in self._attempted for r in group):
                self._attempted.add(merged.id)
            self.stats.merged_records += len(group)
            out.append(merged)
        return out

    # ------------------------------------------------------------------ decisions

    def _encode_fitting(
        self, record: Record, historical: bool, gaps: Sequence[Gap], limit: int | None
    ) -> list[_Part]:
        """The record's messages, split into sub-records until each fits `limit`. A
        record the encoder fails on is split too, so that only the samples it cannot
        encode are set aside: parts with `poison` set carry no messages.

        With an encoder that keeps state per message (`stateful`: Sparkplug marks a
        device born when it makes its DBIRTH), a record whose stored data, or an upper
        estimate of its messages, is larger than the limit is split before it is
        encoded, so that the encoder runs once per part that is sent. The JSON layouts
        are encoded and measured, then split by their messages' size."""
        if limit is not None and record.count > 1 and getattr(self.encoder, "stateful", False):
            # Whichever is larger: the stored bytes, or a generous bound of what the
            # encoder makes per value (a compact stored record is far smaller than a
            # Sparkplug DBIRTH of the same samples).
            estimate = max(len(record.data), record.count * _STATEFUL_BYTES_PER_VALUE)
            if estimate > limit:
                return self._split_encode(
                    record, historical, gaps, limit, math.ceil(estimate / limit)
                )
        try:
            messages = self._encode(record, historical, gaps)
        except _Poison as exc:
            if record.count < 2:
                return [_Part(0, record, [], exc)]
            return self._split_encode(record, historical, gaps, limit, 2)
        if limit is None or all(packet_size(m) <= limit for m in messages):
            return [_Part(0, record, messages)]
        biggest = max(packet_size(m) for m in messages)
        if record.count < 2:
            reason = f"too large: one sample needs a {biggest}-byte packet, the limit is {limit}"
            return [_Part(0, record, [], _Poison(reason, PACKET_TOO_LARGE))]
        # As many parts as the size asks for, with a margin for each part's own head; a
        # part that still does not fit is split again.
        return self._split_encode(
            record, historical, gaps, limit, math.ceil(biggest / (limit * _FILL))
        )

    def _split_encode(
        self, record: Record, historical: bool, gaps: Sequence[Gap], limit: int | None, n: int
    ) -> list[_Part]:
        parts: list[_Part] = []
        for piece in _pieces(record, max(2, n)):
            # The gap notices ride on the first part that is sent.
            carried = any(p.poison is None for p in parts)
            parts += self._encode_fitting(piece, historical, () if carried else gaps, limit)
        if all(p.poison is not None for p in parts):
            # Nothing in it can go: one dead letter for the record, not one per sample.
            return [_Part(0, record, [], parts[0].poison)]
        return parts

    def _encode_singles(
        self, record: Record, historical: bool, gaps: Sequence[Gap], limit: int | None
    ) -> list[_Part]:
        """One part per sample (each possibly a poison part)."""
        try:
            samples: list[dict[str, Any]] = record_samples(record.data)
            singles = [_sub(record, [s]) for s in samples]
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise _Poison(f"cannot split: {type(exc).__name__}: {exc}") from None
        out: list[_Part] = []
        for single in singles:
            carried = any(p.poison is None for p in out)
            out += self._encode_fitting(single, historical, () if carried else gaps, limit)
        return out

    def _encode(self, record: Record, historical: bool, gaps: Sequence[Gap]) -> list[Message]:
        try:
            messages = self.encoder.encode(record, historical=historical, gaps=gaps)
        except Exception as exc:  # the encoder's bug or a value it cannot carry
            raise _Poison(f"cannot encode: {type(exc).__name__}: {exc}") from None
        if not isinstance(messages, list):
            raise _Poison(f"cannot encode: the encoder returned a {type(messages).__name__}")
        if not messages and record.count and not getattr(self.encoder, "may_skip", False):
            # Only a layout that drops records by design (Sparkplug's backlog: drop) may
            # return nothing; anywhere else "no message" would delete unsent samples.
            raise _Poison("cannot encode: the encoder returned no message")
        for m in messages:
            if not isinstance(m, Message) or not isinstance(m.payload, bytes):
                raise _Poison(
                    f"cannot encode: the encoder returned a {type(m).__name__}, not a Message"
                )
        return messages

    @staticmethod
    def _is_connection_failure(result: PublishResult) -> bool:
        return not result.permanent and (result.code is None or result.code < 0x80)

    def _verdict(self, record: Record, result: PublishResult, message: Message) -> str:
        """dead (at once), split (retry smaller), refused (device backoff) or connection."""
        if result.code == PACKET_TOO_LARGE:
            if record.count < 2:
                return "dead"
            # The broker's limit is below what we assumed: smaller parts next time.
            size = packet_size(message)
            current = self._split_limit.get(record.id, size)
            self._split_limit[record.id] = max(1, min(current, size) // 2)
            return "split"
        if _permanent(result):
            return "dead"
        if result.code is not None and result.code >= 0x80:
            return "refused"
        return "connection"

    def _count_failure(self, result: PublishResult) -> None:
        reason = result.reason or "unknown"
        self.stats.messages_failed += 1
        self.stats.failures_by_reason[reason] = self.stats.failures_by_reason.get(reason, 0) + 1
        if result.code is not None and result.code >= 0x80:
            self.stats.refusals += 1
            self.stats.refusals_by_reason[reason] = self.stats.refusals_by_reason.get(reason, 0) + 1

    def _device_backs_off(self, device: str, result: PublishResult, tries: int, now: float) -> None:
        nominal = min(self.device_backoff_max_s, self.device_backoff_min_s * 2 ** max(0, tries - 1))
        delay = nominal * (0.5 + 0.5 * self._rng.random())
        first = device not in self._backoff_logged
        self._backoff_logged.add(device)
        self.stats.backing_off[device] = DeviceBackoff(
            reason=result.reason or "refused",
            code=result.code,
            refusals=tries,
            retry_at=now + delay,
        )
        if first:
            log.warning(
                "forward.device.backoff",
                device=device,
                reason=result.reason,
                code=result.code,
                retry_in_s=round(delay, 2),
                note="this device's records wait; other devices are not affected",
            )

    def _device_recovered(self, device: str) -> None:
        self.stats.backing_off.pop(device, None)
        if device in self._backoff_logged:
            self._backoff_logged.discard(device)
            log.info("forward.device.recovered", device=device)
        self._logged = {k for k in self._logged if device not in k}

    async def _dead_letter(self, record: Record, reason: str, code: int | None, tries: int) -> bool:
        """Move `record` to the store (before the caller deletes it from the buffer).
        False when the store failed: the record then stays in the buffer."""
        try:
            letter_id = await self.dead_letters.add(record, reason, code, tries)
        except Exception as exc:
            if ("store", record.device) not in self._logged:
                self._logged.add(("store", record.device))
                log.error(
                    "forward.dead_letter.failed",
                    device=record.device,
                    first_seq=record.first_seq,
                    reason=reason,
                    error=f"{type(exc).__name__}: {exc}",
                    store=self.dead_letters.path or "memory",
                    note="kept in the buffer; the device backs off and it is tried again",
                )
            return False
        self._refusals.pop(record.id, None)
        self._split_limit.pop(record.id, None)
        self._round_dead.add(record.device)
        self.stats.dead_lettered_records += 1
        self.stats.dead_lettered_samples += record.count
        key = _reason_key(reason)
        self.stats.dead_lettered_by_reason[key] = self.stats.dead_lettered_by_reason.get(key, 0) + 1
        if self._dead_pending is not None:
            self._fold(
                record.device,
                record.first_seq,
                record.last_seq,
                record.count,
                letter_id,
                record.epoch,
            )
        fields: dict[str, Any] = {
            "device": record.device,
            "first_seq": record.first_seq,
            "last_seq": record.last_seq,
            "samples": record.count,
            "reason": reason,
            "code": code,
            "tries": tries,
            "store": self.dead_letters.path or "memory",
        }
        if (record.device, key) in self._logged:
            log.debug("forward.dead_letter", **fields)
        else:
            self._logged.add((record.device, key))
            log.error(
                "forward.dead_letter",
                **fields,
                note="logged once per device and reason; all are counted",
            )
        return True

    # ------------------------------------------------------------------ gaps, replay

    async def _pending_gaps(self) -> list[Gap]:
        """The buffer's gaps, re-read only when it dropped something since last time."""
        dropped = self.buffer.stats().dropped_samples
        if dropped != self._gaps_dropped_seen:
            self._gaps_dropped_seen = dropped
            self._gaps = await self.buffer.take_gaps()
        return self._gaps

    async def _pending_dead_gaps(self) -> list[Gap]:
        """Gap notices for dead letters not announced yet (loaded once per run)."""
        if self._dead_pending is None:
            self._dead_pending = {}
            for d in await self.dead_letters.unannounced():
                self._fold(d.device, d.first_seq, d.last_seq, d.count, d.id, d.epoch)
        gaps = sorted(self._dead_pending.values(), key=lambda g: g.first_seq)
        if len(gaps) > MAX_DEAD_LETTER_GAPS:
            gaps = [
                Gap(
                    min(g.first_seq for g in gaps),
                    max(g.last_seq for g in gaps),
                    sum(g.count for g in gaps),
                    DEAD_LETTER_GAP,
                )
            ]
        return gaps

    def _fold(
        self,
        device: str,
        first_seq: int,
        last_seq: int,
        count: int,
        letter_id: int,
        epoch: str = "",
    ) -> None:
        """Add one dead letter to its device's pending notice: one range per device (and
        epoch), whose seqs need not be contiguous (the range then also covers seqs
        delivered in between, which a Gap allows). So the notice stays small however many
        records were set aside before a message could carry it (e.g. an ACL that denies
        every topic). A notice of another epoch than the message's names its epoch."""
        assert self._dead_pending is not None
        key = f"{device}\0{epoch}"
        g = self._dead_pending.get(key)
        self._dead_pending[key] = (
            Gap(first_seq, last_seq, count, DEAD_LETTER_GAP, epoch)
            if g is None
            else Gap(
                min(g.first_seq, first_seq),
                max(g.last_seq, last_seq),
                g.count + count,
                DEAD_LETTER_GAP,
                epoch,
            )
        )
        self._dead_max_id = max(self._dead_max_id, letter_id)

    async def _replay_if_due(self) -> None:
        """Publish the dead letters an operator queued for replay."""
        if time.monotonic() < self._next_replay_check:
            return
        self._next_replay_check = time.monotonic() + self.replay_check_s
        if self.dead_letters.path is not None:
            await self.dead_letters.refresh()
        if not self.dead_letters.stats().replay_pending:
            return
        await self.replay_once()

    async def replay_once(self) -> int:
        """Send one batch of queued dead letters; returns how many were delivered."""
        letters = await self.dead_letters.take_replays(_REPLAY_BATCH)
        if not letters:
            return 0
        self._check_session()
        limit = self._limit()
        parts: list[_Part] = []
        for i, letter in enumerate(letters):
            record = letter.as_record()
            pre: list[Message] = []
            try:
                pre = self._preamble(record, limit)
                encoded = self._encode_fitting(record, True, (), limit)
            except _Poison as exc:
                encoded = [_Part(i, record, [], exc)]
            unsendable = next((p.poison for p in encoded if p.poison is not None), None)
            if unsendable is not None:
                # Still not publishable as it is: it stays, whole, with its new reason.
                self.encoder.unannounce(record.device)
                await self.dead_letters.replay_failed(letter.id, unsendable.reason, unsendable.code)
                continue
            if pre:
                parts.append(_Part(i, record, pre))
            parts.extend(_Part(i, p.record, p.messages) for p in encoded)
        messages = [m for p in parts for m in p.messages]
        results = await self.publisher.publish(messages) if messages else []
        failed: dict[int, PublishResult] = {}
        at = 0
        for part in parts:
            for result in results[at : at + len(part.messages)]:
                if not result.ok:
                    failed.setdefault(part.index, result)
            at += len(part.messages)
        done = [letters[i] for i in {p.index for p in parts} if i not in failed]
        for i, result in failed.items():
            self.encoder.unannounce(letters[i].device)
            if not self._is_connection_failure(result):
                await self.dead_letters.replay_failed(
                    letters[i].id, result.reason or "refused", result.code
                )
            # A lost connection leaves it queued: it is sent again after the reconnect.
        await self.dead_letters.replayed([d.id for d in done])
        self.stats.replayed_records += len(done)
        self.stats.replayed_samples += sum(d.count for d in done)
        if done:
            log.info(
                "forward.replayed",
                records=len(done),
                samples=sum(d.count for d in done),
                devices=sorted({d.device for d in done}),
            )
        return len(done)

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


#: Bytes per value a stateful encoder (Sparkplug) is assumed to need when the forwarder
#: splits a record before encoding it (bench/wire_bytes.py measures ≈ 34 per value in
#: DDATA, ≈ 43 in a DBIRTH, with short tag names).
_STATEFUL_BYTES_PER_VALUE = 64

#: A part is planned to fill this share of the packet limit (its head and a slice that
#: encodes longer than the average are what the rest is for).
_FILL = 0.95

#: At most this many dead-letter gaps ride on one message; with more devices they are
#: announced as one range.
MAX_DEAD_LETTER_GAPS = 16


def _permanent(result: PublishResult) -> bool:
    """Refused for good: sending the same message again would fail the same way."""
    return result.permanent or result.code in PERMANENT_CODES


def _reason_key(reason: str) -> str:
    """A bounded label for counting (exception texts carry values; keep the kind)."""
    if reason.startswith("cannot encode: "):
        return "cannot encode: " + reason.removeprefix("cannot encode: ").split(":")[0]
    if reason.startswith("too large"):
        return "too large"
    if reason.startswith("invalid message"):
        return "invalid message"
    return reason


def _pieces(record: Record, n: int) -> list[Record]:
    """Split a record's samples into n consecutive sub-records (as equal as can be) with
    exact seqs and counts."""
    try:
        samples: list[dict[str, Any]] = record_samples(record.data)
        n = min(n, len(samples))
        size, rest = divmod(len(samples), n)
        out = []
        at = 0
        for k in range(n):
            end = at + size + (1 if k < rest else 0)
            out.append(_sub(record, samples[at:end]))
            at = end
        return out
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise _Poison(f"cannot split: {type(exc).__name__}: {exc}") from None


def _sub(record: Record, samples: list[dict[str, Any]]) -> Record:
    """A sub-record of `record` holding `samples` (a slice of its decoded samples),
    encoded by the record codec, so that it decodes to exactly those samples; it keeps
    the record's epoch."""
    return Record(
        id=record.id,
        device=record.device,
        first_seq=int(samples[0]["seq"]),
        last_seq=int(samples[-1]["seq"]),
        count=len(samples),
        created=record.created,
        data=encode_samples(samples),
        epoch=record.epoch,
    )
