"""An in-memory Publisher for tests of the code above it (the forwarder, the runtime).

It follows the Publisher contract exactly — one result per message, in order; 'not
connected' for everything while disconnected; never raises — and lets a test script the
broker's behaviour:

    pub = FakePublisher()
    await pub.start()                      # connected at once (connect_on_start=True)
    pub.fail_next(3, "Not authorized", code=0x87)
    pub.set_ack_delay(0.05)                # acks arrive after 50 ms
    pub.set_connected(False)               # broker outage: publish() → 'not connected'
    pub.refuse_topic("edge/gw/press", "Not authorized", 0x87)  # an ACL that denies a topic
    pub.max_packet_size = 16384            # as the broker's CONNACK would announce
    pub.published                          # every message acknowledged, in order

Messages that are acknowledged are appended to `published`; `attempts` records every
message handed to publish() together with its result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.publish import PACKET_TOO_LARGE, Message, PublishResult, packet_size


@dataclass(frozen=True, slots=True)
class Attempt:
    """One message handed to publish() and what came of it."""

    message: Message
    result: PublishResult


class FakePublisher:
    """Records what is published; connection state, failures and ack delay are scripted."""

    def __init__(
        self,
        *,
        connect_on_start: bool = True,
        ack_delay_s: float = 0.0,
        max_inflight: int = 100,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.published: list[Message] = []
        self.attempts: list[Attempt] = []
        self.max_inflight = max_inflight
        self.max_seen_inflight = 0
        self.publish_calls = 0
        self._connect_on_start = connect_on_start
        self._ack_delay_s = ack_delay_s
        self._connected = asyncio.Event()
        self._connected_since: float | None = None
        self._fail_next: list[tuple[str, int | None]] = []
        self._closed = False
        self._inflight = 0
        self._generation = 0
        self._refused: dict[str, tuple[str, int | None]] = {}
        #: Messages whose PUBLISH packet is larger fail with 'Packet too large' (0x95),
        #: as MqttPublisher does for the limit from the broker's CONNACK.
        self.max_packet_size: int | None = None

    # ------------------------------------------------------------------ scripting

    def set_connected(self, connected: bool) -> None:
        """Bring the fake connection up or down. Going down fails every message still
        waiting for its (delayed) ack with 'disconnected before ack'."""
        if connected and not self._closed:
            if not self._connected.is_set():
                self._connected_since = time.time()
            self._connected.set()
        elif not connected and self._connected.is_set():
            self._connected.clear()
            self._generation += 1

    def fail_next(self, count: int, reason: str, code: int | None = None) -> None:
        """The next `count` messages that reach the broker fail with `reason` / `code`."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._fail_next.extend([(reason, code)] * count)

    def refuse_topic(self, topic: str, reason: str | None, code: int | None = None) -> None:
        """Every message on `topic` fails with reason/code (None: stop refusing it)."""
        if reason is None:
            self._refused.pop(topic, None)
        else:
            self._refused[topic] = (reason, code)

    def set_ack_delay(self, seconds: float) -> None:
        """Every message is acknowledged this long after it was sent."""
        if seconds < 0:
            raise ValueError("ack delay must be >= 0")
        self._ack_delay_s = seconds

    def clear(self) -> None:
        """Forget what was recorded (published, attempts, counters)."""
        self.published.clear()
        self.attempts.clear()
        self.publish_calls = 0
        self.max_seen_inflight = 0

    # ------------------------------------------------------------------ Publisher

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connected_since(self) -> float | None:
        return self._connected_since if self.connected else None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def start(self) -> None:
        if self._connect_on_start:
            self.set_connected(True)

    async def close(self) -> None:
        self._closed = True
        self.set_connected(False)

    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]:
        self.publish_calls += 1
        if not self.connected:
            return [self._record(m, PublishResult(False, "not connected")) for m in messages]
        generation = self._generation
        results: list[PublishResult] = []
        # Messages go out in windows of max_inflight, each window acked after the delay,
        # which is what a real broker connection looks like from here.
        for start in range(0, len(messages), self.max_inflight):
            window = messages[start : start + self.max_inflight]
            if generation != self._generation:
                results += [self._record(m, PublishResult(False, "not connected")) for m in window]
                continue
            self._inflight += len(window)
            self.max_seen_inflight = max(self.max_seen_inflight, self._inflight)
            try:
                if self._ack_delay_s > 0:
                    await asyncio.sleep(self._ack_delay_s)
            finally:
                self._inflight -= len(window)
            for m in window:
                refused = self._refused.get(m.topic)
                if generation != self._generation:
                    results.append(self._record(m, PublishResult(False, "disconnected before ack")))
                elif "+" in m.topic or "#" in m.topic:
                    # paho raises ValueError for these; MqttPublisher reports it so.
                    reason = "invalid message: Publish topic cannot contain wildcards."
                    results.append(self._record(m, PublishResult(False, reason, permanent=True)))
                elif self.max_packet_size is not None and packet_size(m) > self.max_packet_size:
                    results.append(
                        self._record(m, PublishResult(False, "Packet too large", PACKET_TOO_LARGE))
                    )
                elif refused is not None:
                    results.append(self._record(m, PublishResult(False, *refused)))
                elif self._fail_next:
                    reason, code = self._fail_next.pop(0)
                    results.append(self._record(m, PublishResult(False, reason, code)))
                else:
                    self.published.append(m)
                    results.append(self._record(m, PublishResult(True)))
        return results

    def _record(self, message: Message, result: PublishResult) -> PublishResult:
        self.attempts.append(Attempt(message, result))
        return result
