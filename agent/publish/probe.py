"""One connection to the broker and one QoS 1 publish per topic: the broker check of
`edge-agent doctor`.

It goes through the publisher's own connection code (`MqttPublisher`), so TLS, credentials,
the MQTT version and the error sentences are exactly those of the running agent; only the
background reconnect loop is not started: one attempt, one answer. The probe connects with
its own client id (the agent's plus ``-doctor``), so a running agent is not disconnected by
a session takeover, and sets no will, so no offline status is published.

With MQTT 5 every probe gets the broker's PUBACK reason code (0x87 Not authorized when the
ACL denies the topic). With MQTT 3.1.1 a denied publish is acknowledged like any other, so
`ProbeResult.acl_visible` is False and the result says nothing about the ACL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import MqttConfig
from agent.publish import Message, PublishResult
from agent.publish.mqtt import MqttPublisher


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """connect_error: why the connection failed (None when connected). results: one per
    probed topic, in order (empty when not connected)."""

    connect_error: str | None
    results: tuple[tuple[str, PublishResult], ...] = ()
    acl_visible: bool = True


async def probe(
    config: MqttConfig,
    client_id: str,
    messages: Sequence[Message],
    *,
    timeout_s: float = 10.0,
) -> ProbeResult:
    """Connect once with `config` and publish each message; never raises for broker trouble.

    Bounded by about `timeout_s` for the connection plus `timeout_s` for the acks."""
    cfg = config.model_copy(update={"publish_timeout_s": min(config.publish_timeout_s, timeout_s)})
    publisher = MqttPublisher(cfg, f"{client_id}-doctor")
    try:
        try:
            async with asyncio.timeout(timeout_s + 1.0):
                error = await publisher.connect_once()
        except TimeoutError:
            error = f"no answer from the broker within {timeout_s:g} s"
        if error is not None:
            return ProbeResult(connect_error=error)
        results = await publisher.publish(list(messages))
        return ProbeResult(
            connect_error=None,
            results=tuple((m.topic, r) for m, r in zip(messages, results, strict=True)),
            acl_visible=cfg.protocol == "5",
        )
    finally:
        await publisher.close()


__all__ = ["ProbeResult", "probe"]
