"""Publishers: how buffered records leave the agent.

A publisher sends messages and reports, per message, whether the broker acknowledged
it. It owns its connection and reconnects by itself (with backoff) in the background;
it never retransmits on its own: a message that was not acknowledged is reported as
failed and the forwarder sends it again from the buffer, so there is exactly one owner
of retransmission (docs/mqtt.md).

Only this package imports paho-mqtt (`session` drives the client from the event loop,
`mqtt` is the publisher on top of it); the rest of the agent sees these types only.
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
    #: MQTT 5 properties (a command's result): correlation data echoed to the requester,
    #: the payload's content type and user properties. Ignored by MQTT 3.1.1.
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message the agent received on a subscription, with its MQTT 5 properties."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class PublishResult:
    """ok: the broker acknowledged the message as delivered. Otherwise `reason` says why
    not (e.g. 'not connected', 'disconnected before ack', 'timeout', or a PUBACK reason
    such as 'Not authorized') and `code` carries an MQTT reason code when there is one."""

    ok: bool
    reason: str | None = None
    code: int | None = None
    #: The message can never be delivered as it is (e.g. paho rejects its topic):
    #: sending it again would fail the same way.
    permanent: bool = False


#: PUBACK reason codes that say the message itself is unacceptable: sending it again
#: fails the same way until an operator changes the broker (ACL) or the config.
PERMANENT_CODES = frozenset({0x87, 0x90, 0x99})
#: PUBACK / publisher code for a message larger than the broker accepts.
PACKET_TOO_LARGE = 0x95


def packet_size(msg: Message, *, v5: bool = True) -> int:
    """Bytes of the PUBLISH packet that carries msg (no properties, no topic alias):
    what the broker compares with the Maximum Packet Size it announced."""
    remaining = 2 + len(msg.topic.encode()) + (2 if msg.qos > 0 else 0) + len(msg.payload)
    if v5:
        remaining += 1  # empty property length
    varint = 1
    while remaining >= 128**varint:
        varint += 1
    return 1 + varint + remaining


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

    # Optional: a publisher that knows the largest packet its broker accepts exposes it
    # as `max_packet_size: int | None` (MqttPublisher does, from the MQTT 5 CONNACK); the
    # forwarder then splits batches to fit instead of having them refused.

    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]:
        """Send every message (at most max_inflight unacknowledged at a time) and return
        one result per message, in order, once each is acknowledged or has failed.
        Never raises for broker or network trouble."""
