"""Publishers: how buffered records leave the agent.

A publisher sends messages and reports, per message, whether the broker acknowledged
it. It owns its connection and reconnects by itself (with backoff) in the background;
it never retransmits on its own: a message that was not acknowledged is reported as
failed and the forwarder sends it again from the buffer, so there is exactly one owner
of retransmission (FIELD-NOTES.md, paho).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class PublishResult:
    """ok: the broker acknowledged the message as delivered. Otherwise `reason` says why
    not (e.g. 'not connected', 'disconnected before ack', 'timeout', or a PUBACK reason
    such as 'Not authorized') and `code` carries an MQTT reason code when there is one."""

    ok: bool
    reason: str | None = None
    code: int | None = None


class Publisher(Protocol):
    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""

    async def close(self) -> None:
        """Disconnect cleanly and stop; never raises."""

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""

    @property
    def connected_since(self) -> float | None:
        """Epoch seconds when the current session came up; None while disconnected.
        Records appended before it are backlog (published as historical)."""

    async def wait_connected(self) -> None:
        """Return once connected (at once if connected)."""

    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]:
        """Send every message (at most max_inflight unacknowledged at a time) and return
        one result per message, in order, once each is acknowledged or has failed.
        Never raises for broker or network trouble."""
