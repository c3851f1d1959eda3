"""Cloud broker profiles (``mqtt.profile``): what AWS IoT Core and Azure IoT Hub accept.

Pure code, no paho: the config checks (agent.config) and the publisher use the same rules.

============================  ==================  =====================================
rule                          aws-iot-core        azure-iot-hub
============================  ==================  =====================================
message size (default limit)  128,000 bytes       256,000 bytes
publishes per second          90 (token bucket,   no limit of ours
                              burst 10)
retained messages             allowed             never (status published non-retained)
will message                  yes (status)        none (IoT Hub reports disconnects)
MQTT version                  5 or 3.1.1          3.1.1 only
client id                     the thing name      the device id
topics                        ≤ 7 slashes,        devices/{device_id}/messages/events/
                              ≤ 256 bytes         + a property bag (agent, device, ...)
login                         mutual TLS (SNI)    SAS token from the device key, or an
                                                  X.509 client certificate
============================  ==================  =====================================

The documented "128 KB" and "256 KB" are taken as 128,000 and 256,000 bytes (the smaller
reading of KB), counted over the whole PUBLISH packet: a message within the limit is then
within it whichever way the platform counts. See docs/cloud.md.

**SAS tokens** (`sas_token`): ``SharedAccessSignature sr={uri}&sig={sig}&se={expiry}``
where uri is the url-encoded ``{hub_host}/devices/{device_id}``, and sig the url-encoded
base64 of HMAC-SHA256, keyed with the base64-decoded device key, over
``{uri}\\n{expiry}``. A token is made for every connection attempt, valid for
``azure.sas_ttl_s``; the connection is closed and made again with a fresh token once
`RENEW_FRACTION` of that time has passed (`Login.renew_at`), so an expired token never
ends a session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

if TYPE_CHECKING:
    from agent.config import MqttConfig

Profile = Literal["generic", "aws-iot-core", "azure-iot-hub"]
PROFILES: tuple[Profile, ...] = ("generic", "aws-iot-core", "azure-iot-hub")

AWS = "aws-iot-core"
AZURE = "azure-iot-hub"

#: Largest packet per platform, bytes (see the module doc for how KB is read).
_MESSAGE_LIMITS: dict[str, int] = {AWS: 128_000, AZURE: 256_000}

#: AWS IoT Core: publishes per second per connection (its limit is 100; the bucket's
#: burst comes on top of the rate, so 90 + 10 keeps any one second within 100).
AWS_PUBLISHES_PER_S = 90.0
AWS_PUBLISH_BURST = 10
AWS_PUBLISH_LIMIT_PER_S = 100
AWS_MAX_SLASHES = 7
AWS_TOPIC_MAX_BYTES = 256
AWS_CLIENT_ID_MAX_BYTES = 128

AZURE_API_VERSION = "2021-04-12"
#: A new token (and connection) once this share of a token's lifetime has passed.
RENEW_FRACTION = 0.8

#: Characters a name may hold to go into an Azure property bag unchanged (RFC 3986
#: "unreserved": url-encoding leaves them as they are).
URL_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

#: The clock used for SAS expiry times (tests replace it).
clock: Callable[[], float] = time.time


def message_limit(profile: str) -> int | None:
    """The default largest message (whole PUBLISH packet, bytes) of a platform: 128,000
    for aws-iot-core, 256,000 for azure-iot-hub, None for generic (no limit of its own:
    the broker's CONNACK Maximum Packet Size, or the caller's default, applies)."""
    return _MESSAGE_LIMITS.get(profile)


def allows_retain(profile: str) -> bool:
    """Whether the platform keeps retained messages (Azure IoT Hub does not)."""
    return profile != AZURE


def allows_will(profile: str) -> bool:
    """Whether the agent sets an MQTT will (not on Azure IoT Hub: its own device
    connection state reports a lost connection)."""
    return profile != AZURE


def publish_rate(profile: str, configured: float | None) -> tuple[float, int] | None:
    """(publishes per second, burst) for the connection's token bucket, or None for no
    limit: `configured` (mqtt.max_publishes_per_s) when set, else the platform's."""
    if configured is not None:
        return configured, max(1, min(AWS_PUBLISH_BURST, int(configured // 10)))
    if profile == AWS:
        return AWS_PUBLISHES_PER_S, AWS_PUBLISH_BURST
    return None


# ------------------------------------------------------------------ Azure IoT Hub


def azure_username(hub_host: str, device_id: str) -> str:
    return f"{hub_host}/{device_id}/?api-version={AZURE_API_VERSION}"


def azure_events(device_id: str) -> str:
    """The one topic a device publishes telemetry to (a property bag may follow)."""
    return f"devices/{device_id}/messages/events/"


_CONTENT = "$.ct=application%2Fjson&$.ce=utf-8"


def azure_topics(device_id: str, layout: str) -> dict[str, str]:
    """The agent's topic templates under azure-iot-hub: the events topic with a property
    bag that says what the message is (``msg-type``: data, status, device-status), whose
    it is (agent, device, tag) and its content type. The names must be `URL_UNRESERVED`
    (checked by the config), so the templates need no encoding at run time."""
    base = azure_events(device_id) + _CONTENT
    return {
        "topic": f"{base}&agent={{agent}}&device={{device}}&layout={layout}&msg-type=data",
        "topic_tag": (
            f"{base}&agent={{agent}}&device={{device}}&tag={{tag}}&layout=tag&msg-type=data"
        ),
        # Layout compact's metadata: not retained there, an ordinary message in the stream.
        "topic_meta": (
            f"{base}&agent={{agent}}&device={{device}}&meta={{meta}}&layout=compact&msg-type=meta"
        ),
        "status_topic": f"{base}&agent={{agent}}&msg-type=status",
        "device_status_topic": f"{base}&agent={{agent}}&device={{device}}&msg-type=device-status",
    }


def sas_token(resource_uri: str, key_b64: str, expiry: int) -> str:
    """A SharedAccessSignature for `resource_uri` (e.g. ``myhub.azure-devices.net/devices/
    gw1``) signed with the base64 device key, valid until `expiry` (Unix seconds).
    Raises ValueError for a key that is not base64."""
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the device key is not base64") from None
    uri = quote(resource_uri, safe="")
    digest = hmac.new(key, f"{uri}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={uri}&sig={sig}&se={expiry}"


def key_problem(key_b64: str) -> str | None:
    """Why a device key cannot sign, or None."""
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        return "not base64 (copy the device's primary or secondary key as shown by the hub)"
    if not key:
        return "empty"
    return None


@dataclass(frozen=True, slots=True)
class Login:
    """User name and password for one connection attempt; `renew_at` (Unix seconds):
    connect again with a fresh login by then (None: never needed)."""

    username: str | None
    password: str | None
    renew_at: float | None = None


def login(cfg: MqttConfig) -> Login:
    """The credentials for the next connection attempt. Raises OSError when a password
    or key file cannot be read, ValueError for a device key that is not base64."""
    azure = cfg.azure
    if cfg.profile == AZURE and azure is not None:
        username = azure_username(azure.hub_host, azure.device_id)
        key = azure.resolved_device_key()
        if key is None:
            return Login(username, None)  # X.509: the client certificate is the login
        issued = clock()
        expiry = int(issued) + azure.sas_ttl_s
        token = sas_token(f"{azure.hub_host}/devices/{azure.device_id}", key, expiry)
        return Login(username, token, renew_at(issued, expiry))
    return Login(cfg.username, cfg.resolved_password() if cfg.username is not None else None)


def renew_at(issued: float, expiry: float) -> float:
    """When to connect again with a new token: RENEW_FRACTION into its lifetime."""
    return issued + RENEW_FRACTION * (expiry - issued)


# ------------------------------------------------------------------ rate limit


class TokenBucket:
    """At most `rate` × t + `burst` takes in any t seconds. `delay()` says how long to wait
    before the next take is allowed; `take()` always takes (it may go into debt, which
    later takes wait off), so messages that must go at once (a birth) still count."""

    def __init__(self, rate: float, burst: int, now: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._now = now
        self._tokens = float(burst)
        self._at = now()

    def _refill(self) -> None:
        now = self._now()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self) -> float:
        """Seconds until a take is within the limit (0: now)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self) -> None:
        self._refill()
        self._tokens -= 1


__all__ = [
    "AWS",
    "AZURE",
    "PROFILES",
    "Login",
    "Profile",
    "TokenBucket",
    "allows_retain",
    "allows_will",
    "azure_topics",
    "azure_username",
    "login",
    "message_limit",
    "publish_rate",
    "renew_at",
    "sas_token",
]
