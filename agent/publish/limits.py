"""How large a message may be: `mqtt.max_message_bytes`, the broker's CONNACK and a
platform's documented limit, combined in one place.

The forwarder splits every record whose message would be larger than
`effective_max_message_bytes(...)` (docs/mqtt.md, "Messages that fit the broker"); the
publisher refuses (0x95) anything over the broker's announced Maximum Packet Size before
it is sent. A cloud broker profile that knows its platform's limit (AWS IoT Core 128 KB,
Azure IoT Hub 256 KB) passes it as `platform_bytes`.
"""

from __future__ import annotations

#: The limit when neither the config, nor the broker, nor a platform profile says one:
#: AWS IoT Core's message size, the smallest of the common cloud brokers.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024


def effective_max_message_bytes(
    configured: int | None,
    broker: int | None,
    *,
    platform_bytes: int | None = None,
) -> int:
    """The largest MQTT packet to send.

    configured: `mqtt.max_message_bytes` (None: not set). broker: the Maximum Packet
    Size of the MQTT 5 CONNACK (None: not announced, or MQTT 3.1.1). platform_bytes: the
    limit of a broker profile's platform (used when nothing is configured, instead of
    the broker's announcement or DEFAULT_MAX_MESSAGE_BYTES).

    A configured value wins over the defaults; the broker's announced limit always
    applies on top (a larger message would be refused)."""
    if configured is not None:
        limit = configured
    elif platform_bytes is not None:
        limit = platform_bytes
    elif broker is not None:
        return broker
    else:
        return DEFAULT_MAX_MESSAGE_BYTES
    return min(limit, broker) if broker is not None else limit
