"""The OPC UA driver: connect, read (poll groups), subscribe (monitored items), close.

Ownership of reconnection: the agent's poller. asyncua's `auto_reconnect` stays off and
its stale-subscription watchdog never sees our subscription (we create it ourselves, not
through `Client.create_subscription`), so nothing inside asyncua reconnects or recreates
anything behind the poller's back. asyncua's connection supervisor still runs: with
auto_reconnect off it only probes the server state every `watchdog_interval_s` and, on a
failed probe or a dropped socket, calls our `connection_lost_callback` once, which makes
`wait_closed()` raise DriverUnavailable.

A subscription can stop without any error reaching us (asyncua's publish loop simply
returns on BadNoSubscription, for example after the server deleted it). Our own
staleness watchdog therefore watches the time since the last Publish response (data or
keep-alive): none within `stale_after_s` (a few keep-alive periods) makes `wait_closed()`
raise DriverUnavailable("subscription stale"), so the poller closes, reconnects and
subscribes again; asyncua's own stale-subscription watchdog, which would recreate it
behind our back, only knows subscriptions made by `Client.create_subscription`.

Notifications go to the sink through a bounded outbox: when the sink (the agent's
writer) is slow, the Publish callback waits for room, which stops asyncua's publish
loop from asking for more, and the server queues (backpressure, never an unbounded
list). Time spent waiting for our own consumer is not staleness. `close()` hands every
notification already received to its sink before it returns; only a sink that does not
take them within `DRAIN_TIMEOUT_S` loses them (counted in `stats.dropped`, logged as
`driver.outbox.dropped`).

Every connect starts from nothing: a new asyncua Client, a fresh endpoint and trust
check, fresh OperationLimits, namespace indexes, browse-path translation and data type
definitions (a PLC download may have changed any of them). `close()` closes the session
with DeleteSubscriptions so that sessions and subscriptions do not pile up on the server;
a session whose connection died is freed by the server after `session_timeout_s`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import math
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.base import (
    DriverConfigError,
    DriverError,
    DriverUnavailable,
    RawReading,
    SampleSink,
    Scalar,
    Value,
    WriteRefused,
)
from drivers.opcua import certs
from drivers.opcua.config import (
    OpcUaDevice,
    OpcUaTag,
    SecurityModeName,
    SecurityPolicyName,
    TimestampChoice,
    parse_browse_path,
    parse_node_id,
)

log = structlog.get_logger(__name__)

POLICIES: dict[SecurityPolicyName, type[security_policies.SecurityPolicy]] = {
    "None": security_policies.SecurityPolicyNone,
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES: dict[SecurityModeName, ua.MessageSecurityMode] = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

# Status codes that mean "the configuration (credentials, certificates, security
# settings) is wrong", as opposed to "the server cannot be reached right now".
_CONFIG_CODES = {
    "BadUserAccessDenied",
    "BadIdentityTokenInvalid",
    "BadIdentityTokenRejected",
    "BadSecurityChecksFailed",
    "BadSecurityPolicyRejected",
    "BadSecurityModeRejected",
    "BadApplicationSignatureInvalid",
    "BadCertificateInvalid",
    "BadCertificateUntrusted",
    "BadCertificateUriInvalid",
    "BadCertificateTimeInvalid",
    "BadCertificateHostNameInvalid",
    "BadCertificateUseNotAllowed",
    "BadCertificateRevoked",
    "BadCertificateIssuerRevoked",
    "BadCertificateRevocationUnknown",
    "BadNoValidCertificates",
}
_HINTS = {
    "BadUserAccessDenied": "the server refused the user name or password",
    "BadIdentityTokenRejected": "the server does not accept this kind of login",
    "BadIdentityTokenInvalid": "the server could not read the login token",
    "BadSecurityChecksFailed": "the server does not trust our client certificate; {trust}",
    "BadCertificateUntrusted": "the server does not trust our client certificate; {trust}",
    "BadCertificateUriInvalid": "the certificate's SubjectAltName URI differs from the "
    "ApplicationUri (check application_uri)",
    "BadTooManySessions": "the server has no free session; sessions of dead connections "
    "are freed after their session timeout",
}

_T = TypeVar("_T")


def status_name(code: int) -> str:
    """The symbolic name of a status code, ignoring its info bits (`BadNodeIdUnknown`)."""
    return str(ua.StatusCode(code & 0xFFFF0000).name)  # type: ignore[arg-type]


def quality_of(code: int) -> tuple[str, str | None, int | None]:
    """(quality, reason, code) for a status code: severity bits 00 good, 01 uncertain,
    10/11 bad. Plain Good (0) carries neither reason nor code."""
    if code == 0:
        return "good", None, None
    severity = code >> 30
    if severity == 0:
        return "good", None, code
    if severity == 1:
        return "uncertain", status_name(code), code
    return "bad", status_name(code), code


def convert_value(value: Any) -> Value | None:
    """A Variant's Python value as a published value: scalars stay, lists stay lists,
    structures (decoded ExtensionObjects) become dicts, other built-ins become strings."""
    if value is None:
        return None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        inner = value.value
        return inner if isinstance(inner, int | str) else str(inner)
    if isinstance(value, int | float):
        return value
    if isinstance(value, list):
        items: list[Any] = [_scalar_or_structure(v) for v in value]
        return items
    converted: Value = _scalar_or_structure(value)
    return converted


def _scalar_or_structure(value: Any) -> Any:
    if isinstance(value, list):
        return [_scalar_or_structure(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName):
        return f"{value.NamespaceIndex}:{value.Name}"
    if isinstance(value, ua.NodeId):
        return str(value.to_string())
    if isinstance(value, ua.StatusCode):
        return int(value.value)
    if isinstance(value, ua.ExtensionObject):
        raise _UndecodedStructure(value.TypeId.to_string())
    if isinstance(value, ua.Variant):
        return _scalar_or_structure(value.Value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _scalar_or_structure(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    return str(value)


class _UndecodedStructure(Exception):
    """An ExtensionObject whose type definition the server did not provide."""


#: OPC UA's MinDateTime (a DateTime of 0, decoded as 1601-01-01) and MaxDateTime mean
#: "no time"; a timestamp before 1970 cannot be a device's clock either, and cannot be
#: said by every payload (Sparkplug: unsigned epoch milliseconds).
_TS_MIN = datetime(1970, 1, 1, tzinfo=UTC)
_TS_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def checked_timestamp(ts: object) -> tuple[datetime | None, str | None]:
    """(timestamp, why it was dropped): a usable UTC datetime, or None and the reason.

    A naive datetime is UTC (the OPC UA DateTime is UTC by definition)."""
    if ts is None:
        return None, None
    if not isinstance(ts, datetime):
        return None, f"ts_source invalid ({type(ts).__name__})"
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    try:
        in_range = _TS_MIN <= ts < _TS_MAX
    except (OverflowError, ValueError):
        in_range = False
    if not in_range:
        return None, f"ts_source out of range ({ts.isoformat()})"
    return ts, None


def reading_from_datavalue(
    tag: str, dv: ua.DataValue, timestamp: TimestampChoice = "source"
) -> RawReading:
    """One tag's RawReading from a DataValue; never puts an error text into the value.

    A null Variant with a status that is not bad becomes a bad reading with reason
    `null value` (a value the server did not give cannot be good); an unusable
    timestamp (see `checked_timestamp`) becomes ts_source None, its reason in `reason`
    when the reading has none of its own."""
    code = int(dv.StatusCode.value) if dv.StatusCode is not None else 0
    quality, reason, raw_code = quality_of(code)
    raw_ts: object = None
    if timestamp == "source":
        raw_ts = dv.SourceTimestamp
    elif timestamp == "server":
        raw_ts = dv.ServerTimestamp
    ts, ts_problem = checked_timestamp(raw_ts)
    value: Value | None = None
    if quality != "bad":
        raw = dv.Value.Value if dv.Value is not None else None
        if raw is None:
            return RawReading(tag, None, "bad", "null value", raw_code, ts)
        try:
            value = convert_value(raw)
        except _UndecodedStructure:
            # The server gave no definition of this structure type: no value we could
            # publish honestly.
            return RawReading(tag, None, "bad", "StructureTypeUnknown", None, ts)
    return RawReading(
        tag=tag,
        value=value,
        quality=quality,  # type: ignore[arg-type]
        reason=reason if reason is not None else ts_problem,
        code=raw_code,
        ts_source=ts,
    )


def trust_hint(own_cert: Path | None) -> str:
    """What to do when a server does not trust our certificate, naming the file."""
    if own_cert is None:
        return "trust <cert_dir>/own/cert.der on the server (see drivers/opcua/README.md)"
    where = f"trust {own_cert}"
    with contextlib.suppress(OSError, ValueError):
        where += f" (SHA-1 {certs.sha1_thumbprint(own_cert.read_bytes())})"
    return (
        f"{where} on the server (copy it to the server's trusted client certificates, or "
        "accept it in the server's rejected certificates list), then connect again"
    )


def _rejected_at_open(exc: BaseException) -> bool:
    """asyncua 2.1 fails on an `assert` in open_secure_channel when a server answers
    OpenSecureChannel with a fault (a strict server refusing our certificate)."""
    if not isinstance(exc, AssertionError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "open_secure_channel":
            return True
        tb = tb.tb_next
    return False


def map_error(exc: BaseException, endpoint: str, *, own_cert: Path | None = None) -> DriverError:
    """Any exception from asyncua or the network as one of our driver exceptions.
    `own_cert`: our client certificate, named in the hint when a server refuses it."""
    if isinstance(exc, DriverError):
        return exc
    if _rejected_at_open(exc):
        return DriverConfigError(
            "client certificate rejected",
            f"{endpoint} refused the secure channel: the server does not trust our client "
            f"certificate; {trust_hint(own_cert)}",
            StatusCodes.BadSecurityChecksFailed,
        )
    if isinstance(exc, UaStatusCodeError):
        code = int(exc.code)
        name = status_name(code)
        hint = _HINTS.get(name, "").replace("{trust}", trust_hint(own_cert))
        detail = f"{endpoint}: {hint}" if hint else endpoint
        if name in _CONFIG_CODES:
            return DriverConfigError(name, detail, code)
        return DriverUnavailable(name, detail, code)
    # Connection-level failures carry the OPC UA status code that says the same, so the
    # bad samples they cause have a code like every other bad OPC UA sample.
    if isinstance(exc, TimeoutError):
        return DriverUnavailable(
            "timeout", f"{endpoint}: no answer in time", StatusCodes.BadTimeout
        )
    if isinstance(exc, ConnectionRefusedError):
        return DriverUnavailable("connection refused", endpoint, StatusCodes.BadNotConnected)
    if isinstance(exc, OSError):
        return DriverUnavailable(
            "connection lost", f"{endpoint}: {exc}", StatusCodes.BadConnectionClosed
        )
    if isinstance(exc, UaError):
        return DriverConfigError(
            "protocol error", f"{endpoint}: {exc}", StatusCodes.BadCommunicationError
        )
    return DriverUnavailable(
        type(exc).__name__, f"{endpoint}: {exc}", StatusCodes.BadCommunicationError
    )


def _ns0(identifier: int) -> ua.NodeId:
    # asyncua annotates identifiers with its own Int32 class; a plain int is what it uses.
    return ua.NodeId(identifier)  # type: ignore[arg-type]


def _chunks(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    size = size if size > 0 else max(len(items), 1)
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclasses.dataclass(slots=True)
class _Resolved:
    tag: OpcUaTag
    node: ua.NodeId | None
    reason: str | None = None  # why `node` is None
    code: int | None = None


class _BatchSubscription(Subscription):
    """A subscription that hands every Publish response to one coroutine as a whole,
    instead of asyncua's task per notification. asyncua's publish loop awaits it, so
    it waiting for room in the outbox holds the next PublishRequest back."""

    def __init__(
        self,
        session: Any,
        params: ua.CreateSubscriptionParameters,
        on_publish: Callable[[ua.PublishResult], Awaitable[None]],
    ) -> None:
        super().__init__(session, params, None, queue_maxsize=1)
        self._on_publish = on_publish

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        await self._on_publish(publish_result)


#: How long `close()` waits for the sink to take the notifications already received.
DRAIN_TIMEOUT_S = 10.0
#: Publish responses (one batch each) waiting for the sink before the callback waits.
OUTBOX_BATCHES = 64
#: The keep-alive period asked for: at least this, at least one publishing interval.
KEEPALIVE_MIN_S = 1.0
#: Keep-alive periods without any Publish response before the subscription is stale.
STALE_KEEPALIVES = 3


@dataclasses.dataclass
class SubscriptionStats:
    """What went through the outbox (tests and metrics)."""

    received: int = 0  # readings taken from Publish responses
    delivered: int = 0  # readings handed to their sink
    dropped: int = 0  # readings a sink did not take before close gave up (logged)
    full_waits: int = 0  # times the Publish callback waited for room (backpressure)
    stale: int = 0  # times the watchdog declared the subscription stale


#: Built-in types a write can carry, and the raw values each accepts.
WRITABLE_TYPES: dict[ua.VariantType, tuple[int, int] | str] = {
    ua.VariantType.Boolean: "bool",
    ua.VariantType.SByte: (-(1 << 7), (1 << 7) - 1),
    ua.VariantType.Byte: (0, (1 << 8) - 1),
    ua.VariantType.Int16: (-(1 << 15), (1 << 15) - 1),
    ua.VariantType.UInt16: (0, (1 << 16) - 1),
    ua.VariantType.Int32: (-(1 << 31), (1 << 31) - 1),
    ua.VariantType.UInt32: (0, (1 << 32) - 1),
    ua.VariantType.Int64: (-(1 << 63), (1 << 63) - 1),
    ua.VariantType.UInt64: (0, (1 << 64) - 1),
    ua.VariantType.Float: "float32",
    ua.VariantType.Double: "float64",
    ua.VariantType.String: "str",
}

# ValueRank: -1 scalar, -2 any, -3 scalar or one dimension; 0 and >= 1 are arrays only.
_SCALAR_RANKS = frozenset({-1, -2, -3})


def variant_for(vtype: ua.VariantType, raw: Scalar) -> ua.Variant:
    """The Variant of type `vtype` holding `raw`; WriteRefused("value does not fit") when
    the type cannot hold it (another kind of value, out of range, not finite),
    WriteRefused("type not writable") for a type no scalar raw value can be."""
    kind = WRITABLE_TYPES.get(vtype)
    name = vtype.name
    if kind is None:
        raise WriteRefused("type not writable", f"the node's data type is {name}")
    if kind == "bool":
        if not isinstance(raw, bool):
            raise WriteRefused("value does not fit", f"{name} needs true or false, got {raw!r}")
        return ua.Variant(raw, vtype)
    if kind == "str":
        if not isinstance(raw, str):
            raise WriteRefused("value does not fit", f"{name} needs a string, got {raw!r}")
        return ua.Variant(raw, vtype)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise WriteRefused("value does not fit", f"{name} needs a number, got {raw!r}")
    if isinstance(kind, tuple):
        if not isinstance(raw, int):
            raise WriteRefused("value does not fit", f"{name} needs an integer, got {raw!r}")
        lo, hi = kind
        if not lo <= raw <= hi:
            raise WriteRefused("value does not fit", f"{raw!r} is outside {name} ({lo}..{hi})")
        return ua.Variant(raw, vtype)
    number = float(raw)
    if not math.isfinite(number):
        raise WriteRefused("value does not fit", f"{raw!r} is not a finite number")
    if kind == "float32":
        try:
            struct.pack(">f", number)
        except OverflowError:
            raise WriteRefused("value does not fit", f"{raw!r} is outside Float") from None
    return ua.Variant(number, vtype)


class OpcUaDriver:
    """One OPC UA server, read by polling (Read service) or subscription.

    Implements drivers.base.Driver, SubscribingDriver and WritingDriver.
    """

    def __init__(self, device: OpcUaDevice, *, outbox_batches: int = OUTBOX_BATCHES) -> None:
        self.device = device
        self._client: Client | None = None
        self._resolved: dict[str, list[_Resolved]] = {}
        self._max_nodes_per_read = 0
        self._max_items_per_call = 0
        self._lost = asyncio.Event()
        self._lost_reason: DriverUnavailable = DriverUnavailable("not connected")
        self._subscription: _BatchSubscription | None = None
        self._handles: dict[int, tuple[str, SampleSink]] = {}
        self._next_handle = 1
        self._outbox: asyncio.Queue[tuple[SampleSink, list[RawReading]]] = asyncio.Queue(
            outbox_batches
        )
        self._stranded: list[tuple[SampleSink, list[RawReading]]] = []
        self._deliver_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._last_response = 0.0
        self._waiting_for_room = False
        self._handing = 0  # readings of the batch the deliver task is handing over
        self.stale_after_s = 0.0
        """Seconds without a Publish response after which the subscription is stale
        (set by subscribe from the server's revised intervals)."""
        self.stats = SubscriptionStats()
        self.read_calls = 0
        """Read service calls made so far (tests and metrics)."""
        self.loaded_type_definitions = False
        """Whether the last connect loaded the server's structure type definitions."""
        self._tags = {t.name: t for t in device.tags}
        # Tag → the VariantType its node takes, read at the tag's first write after a
        # connect (a PLC download may change a node's type: read again per session).
        self._write_types: dict[str, ua.VariantType] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def max_nodes_per_read(self) -> int:
        """Nodes per Read call in use (0: no limit), from the server's OperationLimits."""
        return self._max_nodes_per_read

    @property
    def max_monitored_items_per_call(self) -> int:
        """Monitored items per CreateMonitoredItems call in use (0: no limit)."""
        return self._max_items_per_call

    @property
    def outbox_size(self) -> int:
        """Publish responses waiting for their sink (at most `outbox_batches`)."""
        return self._outbox.qsize()

    async def connect(self) -> None:
        """Open a session (security, trust and login checked first), then read the
        server's limits and namespaces and resolve every tag's node."""
        await self.close()
        dev = self.device
        client = Client(
            dev.endpoint, timeout=dev.timeout_s, watchdog_intervall=dev.watchdog_interval_s
        )
        client.application_uri = dev.application_uri
        client.name = client.description = f"edge-agent {dev.name}"
        client.session_timeout = int(dev.session_timeout_s * 1000)
        self._lost = asyncio.Event()
        client.connection_lost_callback = self._on_connection_lost
        try:
            async with asyncio.timeout(dev.timeout_s * 5 + 1):
                await self._prepare_security(client)
                await client.connect()
        except BaseException as exc:
            await self._discard(client)
            if isinstance(exc, asyncio.CancelledError):
                raise
            own = (
                certs.CertPaths(Path(dev.cert_dir)).cert if dev.security_policy != "None" else None
            )
            raise map_error(exc, dev.endpoint, own_cert=own) from exc
        self._client = client
        try:
            async with asyncio.timeout(dev.timeout_s * 10 + 1):
                await self._after_connect(client)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_error(exc, dev.endpoint) from exc
        log.info("driver.connect.ok", device=dev.name, endpoint=dev.endpoint)

    async def close(self) -> None:
        """Close the session (deleting its subscription) and the connection, then hand
        the notifications already received to their sinks; never raises."""
        client, self._client = self._client, None
        watchdog, self._watchdog_task = self._watchdog_task, None
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.wait([watchdog])
        self._subscription = None
        if client is not None:
            client.connection_lost_callback = None
            await self._discard(client)  # ends the publish loop: nothing more arrives
        await self._drain()
        self._handles = {}
        if not self._lost.is_set():
            self._lost_reason = DriverUnavailable("closed")
            self._lost.set()

    async def _drain(self) -> None:
        """Deliver what the outbox and a cancelled Publish callback still hold, oldest
        first, within DRAIN_TIMEOUT_S; count and log whatever is left."""
        task, self._deliver_task = self._deliver_task, None
        pending, self._stranded = self._stranded, []
        if task is None and not pending:
            return
        done = 0
        in_pending = False
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                if task is not None and not task.done():
                    await self._outbox.join()
                in_pending = True
                for sink, batch in pending:
                    await self._hand(sink, batch)
                    done += 1
        except TimeoutError:
            pass
        finally:
            if task is not None:
                task.cancel()
                # wait() neither raises the task's CancelledError nor swallows our own.
                await asyncio.wait([task])
            # A batch cut off in the sink: the deliver task's, or one of `pending`.
            left = (0 if in_pending else self._handing) + sum(len(b) for _, b in pending[done:])
            self._handing = 0
            while not self._outbox.empty():
                left += len(self._outbox.get_nowait()[1])
                self._outbox.task_done()
            if left:
                self.stats.dropped += left
                log.error(
                    "driver.outbox.dropped",
                    device=self.device.name,
                    n=left,
                    reason=f"the sink took nothing for {DRAIN_TIMEOUT_S:g} s after close",
                )

    async def _discard(self, client: Client) -> None:
        try:
            async with asyncio.timeout(self.device.timeout_s * 2 + 1):
                await client.disconnect()
        except Exception:
            # A dead server cannot confirm CloseSession; the socket still has to go.
            client.disconnect_socket()

    async def wait_closed(self) -> None:
        """Return only by raising DriverUnavailable, once the connection is lost."""
        await self._lost.wait()
        raise self._lost_reason

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._lost_reason = _as_unavailable(map_error(exc, self.device.endpoint))
        log.warning(
            "driver.connection.lost",
            device=self.device.name,
            endpoint=self.device.endpoint,
            reason=self._lost_reason.reason,
        )
        self._lost.set()

    # ------------------------------------------------------------------- security

    async def _prepare_security(self, client: Client) -> None:
        dev = self.device
        mode_name = dev.resolved_security_mode()
        if dev.security_policy == "None" and dev.username is None:
            return
        policy = POLICIES[dev.security_policy]
        mode = MODES[mode_name]
        endpoints = await client.connect_and_get_server_endpoints()
        chosen = [
            ep for ep in endpoints if ep.SecurityPolicyUri == policy.URI and ep.SecurityMode == mode
        ]
        if not chosen:
            offered = ", ".join(
                sorted(
                    {
                        f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]}/{ep.SecurityMode.name}"
                        for ep in endpoints
                    }
                )
            )
            raise DriverConfigError(
                "security policy not offered",
                f"{dev.endpoint} has no endpoint {dev.security_policy}/{mode_name}; it offers "
                f"{offered}",
            )
        endpoint = chosen[0]
        server_der: bytes | None = None
        if endpoint.ServerCertificate:
            server_der = certs.first_certificate(endpoint.ServerCertificate)
        if dev.security_policy != "None" or dev.username is not None:
            if server_der is None:
                raise DriverConfigError(
                    "no server certificate", f"{dev.endpoint} sent no certificate"
                )
            paths = certs.CertPaths(Path(dev.cert_dir))
            if not certs.is_trusted(server_der, paths.trusted, dev.server_certificate_thumbprint):
                raise certs.untrusted_error(server_der, dev.endpoint, paths.trusted, dev.cert_dir)
        if dev.username is not None and dev.password is not None:
            self._check_password_protected(endpoint, policy, mode)
            client.set_user(dev.username)
            client.set_password(dev.password.get_secret_value())
        if dev.security_policy != "None":
            paths = certs.ensure_own_certificate(dev.cert_dir, dev.application_uri)
            await client.set_security(
                policy,
                certificate=str(paths.cert),
                private_key=str(paths.key),
                server_certificate=server_der,
                mode=mode,
            )

    def _check_password_protected(
        self,
        endpoint: ua.EndpointDescription,
        policy: type[security_policies.SecurityPolicy],
        mode: ua.MessageSecurityMode,
    ) -> None:
        tokens = [
            t for t in endpoint.UserIdentityTokens or [] if t.TokenType == ua.UserTokenType.UserName
        ]
        if not tokens:
            raise DriverConfigError(
                "username login not offered",
                f"{self.device.endpoint} offers no user name login on "
                f"{self.device.security_policy}/{self.device.resolved_security_mode()}",
            )
        # asyncua uses the first UserName token policy; an empty URI means the channel's.
        uri = tokens[0].SecurityPolicyUri or policy.URI
        encrypted = mode == ua.MessageSecurityMode.SignAndEncrypt or (
            uri != security_policies.SecurityPolicyNone.URI
        )
        if not encrypted:
            raise DriverConfigError(
                "password would be sent in clear text",
                f"{self.device.endpoint}: neither the channel "
                f"({self.device.security_policy}/{self.device.resolved_security_mode()}) nor "
                "the server's user token policy encrypts it; use security_mode SignAndEncrypt",
            )

    # -------------------------------------------------------------- after connect

    async def _after_connect(self, client: Client) -> None:
        limits = await self._read_raw(
            client,
            [
                _ns0(ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead),
                _ns0(ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall),
                _ns0(
                    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerTranslateBrowsePathsToNodeIds
                ),
                _ns0(ObjectIds.Server_NamespaceArray),
            ],
            AttributeIds.Value,
            0,
        )

        def limit(dv: ua.DataValue, cap: int | None) -> int:
            n = 0
            if dv.StatusCode is None or dv.StatusCode.is_good():
                raw = dv.Value.Value if dv.Value is not None else None
                n = raw if isinstance(raw, int) and raw > 0 else 0
            if cap is not None:
                n = min(n, cap) if n else cap
            return n

        dev = self.device
        self._max_nodes_per_read = limit(limits[0], dev.max_nodes_per_read)
        self._max_items_per_call = limit(limits[1], dev.max_monitored_items_per_call)
        max_translate = limit(limits[2], self._max_nodes_per_read or None)
        ns_raw = limits[3].Value.Value if limits[3].Value is not None else None
        namespaces: list[str] = list(ns_raw) if isinstance(ns_raw, list) else []
        resolved = await self._resolve(client, namespaces, max_translate)
        self._resolved = {}
        self._write_types = {}
        for r in resolved:
            self._resolved.setdefault(r.tag.group, []).append(r)
        await self._load_types_if_needed(client, resolved)

    async def _resolve(
        self, client: Client, namespaces: list[str], max_translate: int
    ) -> list[_Resolved]:
        def ns_index(index: int | None, uri: str | None) -> int | None:
            if index is not None:
                return index
            return namespaces.index(uri) if uri in namespaces else None

        out: list[_Resolved] = []
        paths: list[tuple[_Resolved, ua.BrowsePath]] = []
        for tag in self.device.tags:
            if tag.node_id is not None:
                parsed = parse_node_id(tag.node_id)
                idx = ns_index(parsed.ns_index, parsed.ns_uri)
                if idx is None:
                    out.append(_Resolved(tag, None, "BadNodeIdUnknown"))
                    log.warning(
                        "driver.resolve.namespace_unknown",
                        device=self.device.name,
                        tag=tag.name,
                        namespace=parsed.ns_uri,
                    )
                    continue
                out.append(_Resolved(tag, ua.NodeId.from_string(parsed.with_index(idx))))
                continue
            elements: list[ua.RelativePathElement] = []
            unknown = None
            assert tag.browse_path is not None
            parts = parse_browse_path(tag.browse_path)
            for el in parts[1:] if parts and parts[0].name == "Root" else parts:
                idx = ns_index(el.ns_index, el.ns_uri)
                if idx is None:
                    unknown = el.ns_uri
                    break
                elements.append(
                    ua.RelativePathElement(
                        ReferenceTypeId=_ns0(ObjectIds.HierarchicalReferences),
                        IsInverse=False,  # type: ignore[arg-type]
                        IncludeSubtypes=True,  # type: ignore[arg-type]
                        TargetName=ua.QualifiedName(el.name, idx),
                    )
                )
            r = _Resolved(tag, None)
            out.append(r)
            if unknown is not None:
                r.reason = "BadNoMatch"
                log.warning(
                    "driver.resolve.namespace_unknown",
                    device=self.device.name,
                    tag=tag.name,
                    namespace=unknown,
                )
                continue
            bp = ua.BrowsePath(
                StartingNode=_ns0(ObjectIds.RootFolder),
                RelativePath=ua.RelativePath(Elements=elements),
            )
            paths.append((r, bp))
        for chunk in _chunks(paths, max_translate):
            results = await client.uaclient.translate_browsepaths_to_nodeids(
                [bp for _, bp in chunk]
            )
            for (r, _), res in zip(chunk, results, strict=True):
                code = int(res.StatusCode.value)
                if code >> 30 == 0 and res.Targets:
                    target = res.Targets[0].TargetId
                    r.node = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
                else:
                    r.reason = status_name(code) if code else "BadNoMatch"
                    r.code = code or None
                    log.warning(
                        "driver.resolve.browse_path_failed",
                        device=self.device.name,
                        tag=r.tag.name,
                        browse_path=r.tag.browse_path,
                        reason=r.reason,
                    )
        return out

    async def _load_types_if_needed(self, client: Client, resolved: list[_Resolved]) -> None:
        nodes = [r.node for r in resolved if r.node is not None]
        self.loaded_type_definitions = False
        if not nodes:
            return
        dvs = await self._read_raw(client, nodes, AttributeIds.DataType, self._max_nodes_per_read)
        for dv in dvs:
            dt = dv.Value.Value if dv.Value is not None else None
            if isinstance(dt, ua.NodeId) and (
                dt.NamespaceIndex != 0 or dt == _ns0(ObjectIds.Structure)
            ):
                await client.load_data_type_definitions()
                self.loaded_type_definitions = True
                return

    async def _read_raw(
        self, client: Client, nodes: Sequence[ua.NodeId], attribute: int, per_call: int
    ) -> list[ua.DataValue]:
        out: list[ua.DataValue] = []
        for chunk in _chunks(nodes, per_call):
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=attribute) for n in chunk]
            self.read_calls += 1
            out.extend(await client.uaclient.read(params))
        return out

    # ------------------------------------------------------------------------ read

    def _require_client(self) -> Client:
        if self._client is None:
            raise DriverUnavailable("not connected", self.device.endpoint)
        if self._lost.is_set():
            raise self._lost_reason
        return self._client

    async def read(self, group: str) -> list[RawReading]:
        """One poll of `group`: batched Read calls of DataValues, split to MaxNodesPerRead."""
        client = self._require_client()
        entries = self._resolved.get(group, [])
        nodes = [r.node for r in entries if r.node is not None]
        try:
            dvs = await self._read_raw(client, nodes, AttributeIds.Value, self._max_nodes_per_read)
        except Exception as exc:
            raise _as_unavailable(map_error(exc, self.device.endpoint)) from exc
        values = iter(dvs)
        ts_choice = self.device.timestamp
        out: list[RawReading] = []
        for r in entries:
            if r.node is None:
                out.append(
                    RawReading(r.tag.name, None, "bad", r.reason or "BadNodeIdUnknown", r.code)
                )
            else:
                out.append(reading_from_datavalue(r.tag.name, next(values), ts_choice))
        return out

    # ------------------------------------------------------------------------ write

    async def write(self, tag: str, raw: Scalar) -> None:
        """Write tag `tag` with raw value `raw` (drivers.base.WritingDriver): one Write
        service call of the node's Value attribute, as a Variant of the node's DataType
        (read once per session: DataType and ValueRank; an abstract DataType such as
        Number takes the type of the node's current value). Raises WriteRefused (a
        structure, an array, a type the raw value cannot be, a value the type cannot
        hold: no Write sent), DriverError(status name) when the server refuses it
        (BadNotWritable, BadUserAccessDenied, BadTypeMismatch, BadOutOfRange…),
        DriverUnavailable when the connection fails."""
        config = self._tags.get(tag)
        if config is None:
            raise WriteRefused("unknown tag", f"no tag {tag!r} on device {self.device.name!r}")
        refusal = self.device.write_refusal(tag)
        if refusal is not None:
            raise WriteRefused("not writable", f"{tag}: {refusal}")
        client = self._require_client()
        resolved = next(
            (r for r in self._resolved.get(config.group, []) if r.tag.name == tag), None
        )
        if resolved is None or resolved.node is None:
            reason = (resolved.reason if resolved else None) or "BadNodeIdUnknown"
            code = resolved.code if resolved is not None else None
            raise DriverConfigError(reason, f"{tag}: {config.address}", code)
        node = resolved.node
        endpoint = self.device.endpoint
        try:
            vtype = self._write_types.get(tag)
            if vtype is None:
                vtype = await self._write_type(client, tag, node)
            try:
                variant = variant_for(vtype, raw)
            except WriteRefused as exc:
                raise WriteRefused(exc.reason, f"{tag}: {exc.detail}") from None
            params = ua.WriteParameters()
            params.NodesToWrite = [
                ua.WriteValue(
                    NodeId=node,
                    AttributeId=AttributeIds.Value,
                    Value=ua.DataValue(variant),
                )
            ]
            results = await client.uaclient.write(params)
        except DriverError:
            raise
        except Exception as exc:
            raise map_error(exc, endpoint) from exc
        if len(results) != 1:
            raise DriverUnavailable(
                "protocol error", f"{endpoint}: {len(results)} results for one write"
            )
        code = int(results[0].value)
        if code >> 30 != 0:  # not good (uncertain results do not happen for writes)
            name = status_name(code)
            log.warning("opcua.write.refused", device=self.device.name, tag=tag, status=name)
            raise DriverError(name, f"{tag}: {config.address}", code)

    async def _write_type(self, client: Client, tag: str, node: ua.NodeId) -> ua.VariantType:
        """The VariantType a write of `node` takes, from its DataType and ValueRank."""
        dtype_dv, rank_dv = [
            (await self._read_raw(client, [node], attribute, 0))[0]
            for attribute in (AttributeIds.DataType, AttributeIds.ValueRank)
        ]
        for dv in (dtype_dv, rank_dv):
            code = int(dv.StatusCode.value) if dv.StatusCode is not None else 0
            if code >> 30 >= 2:
                raise DriverError(status_name(code), f"{tag}: reading its DataType", code)
        dtype = dtype_dv.Value.Value if dtype_dv.Value is not None else None
        rank = rank_dv.Value.Value if rank_dv.Value is not None else -1
        if isinstance(rank, int) and rank not in _SCALAR_RANKS:
            raise WriteRefused("not writable", f"{tag}: the node holds an array (ValueRank {rank})")
        if not isinstance(dtype, ua.NodeId):
            raise DriverError("BadTypeMismatch", f"{tag}: the node has no DataType")
        builtin = dtype.NamespaceIndex == 0 and isinstance(dtype.Identifier, int)
        if builtin and 1 <= int(dtype.Identifier) <= 25:
            vtype = ua.VariantType(int(dtype.Identifier))
        else:
            from asyncua.common.ua_utils import data_type_to_variant_type

            vtype = await data_type_to_variant_type(client.get_node(dtype))
        if vtype == ua.VariantType.Variant:  # abstract (Number, Integer, BaseDataType)
            current = (await self._read_raw(client, [node], AttributeIds.Value, 0))[0]
            held = current.Value.VariantType if current.Value is not None else None
            if held is None or held == ua.VariantType.Null:
                raise WriteRefused(
                    "type not writable",
                    f"{tag}: the node's DataType is abstract and it holds no value to take "
                    "the type from",
                )
            vtype = held
        self._write_types[tag] = vtype
        return vtype

    # ------------------------------------------------------------------- subscribe

    async def subscribe(self, group: str, sink: SampleSink) -> None:
        """Monitor the group's nodes; readings go to `sink` one batch per Publish response.

        All groups of a connection share one subscription (its publishing interval is
        the smallest of the subscribed groups'), so a reconnect followed by subscribe()
        never leaves a second subscription on the server.
        """
        client = self._require_client()
        dev = self.device
        opts = dev.group_subscription(group)
        interval_ms = dev.group_intervals()[group] * 1000
        try:
            if self._subscription is None:
                publishing = min(
                    (
                        dev.group_subscription(g).publishing_interval_ms or iv * 1000
                        for g, iv in dev.group_intervals().items()
                        if dev.group_mode(g) == "subscribe"
                    ),
                    default=opts.publishing_interval_ms or interval_ms,
                )
                params = ua.CreateSubscriptionParameters(
                    RequestedPublishingInterval=publishing,
                    RequestedLifetimeCount=10000,
                    # A keep-alive at least every KEEPALIVE_MIN_S (or publishing interval)
                    # when nothing changes: what the staleness watchdog listens for.
                    RequestedMaxKeepAliveCount=max(
                        1, math.ceil(KEEPALIVE_MIN_S * 1000 / publishing)
                    ),
                    MaxNotificationsPerPublish=10000,
                    PublishingEnabled=True,
                    Priority=0,
                )
                sub = _BatchSubscription(client.uaclient.session, params, self._on_publish)
                revised = await sub.init()
                self._subscription = sub
                keepalive_s = (
                    float(revised.RevisedPublishingInterval)
                    * max(1, int(revised.RevisedMaxKeepAliveCount))
                    / 1000
                )
                self.stale_after_s = STALE_KEEPALIVES * keepalive_s + dev.timeout_s
                self._last_response = time.monotonic()
                self._deliver_task = asyncio.create_task(
                    self._deliver(), name=f"opcua-deliver-{dev.name}"
                )
                self._watchdog_task = asyncio.create_task(
                    self._watch_publishing(), name=f"opcua-stale-watchdog-{dev.name}"
                )
            sub = self._subscription
            requests: list[ua.MonitoredItemCreateRequest] = []
            failed: list[RawReading] = []
            mfilter: ua.DataChangeFilter | None = None
            if opts.deadband is not None:
                mfilter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValue,
                    DeadbandType=ua.DeadbandType.Absolute
                    if opts.deadband.type == "absolute"
                    else ua.DeadbandType.Percent,
                    DeadbandValue=opts.deadband.value,
                )
            for r in self._resolved.get(group, []):
                if r.node is None:
                    failed.append(
                        RawReading(r.tag.name, None, "bad", r.reason or "BadNodeIdUnknown", r.code)
                    )
                    continue
                handle = self._next_handle
                self._next_handle += 1
                self._handles[handle] = (r.tag.name, sink)
                mparams = ua.MonitoringParameters(
                    ClientHandle=handle,
                    SamplingInterval=opts.sampling_interval_ms
                    if opts.sampling_interval_ms is not None
                    else interval_ms,
                    QueueSize=opts.queue_size,
                    DiscardOldest=True,
                )
                if mfilter is not None:
                    mparams.Filter = mfilter
                requests.append(
                    ua.MonitoredItemCreateRequest(
                        ItemToMonitor=ua.ReadValueId(NodeId=r.node, AttributeId=AttributeIds.Value),
                        MonitoringMode=ua.MonitoringMode.Reporting,
                        RequestedParameters=mparams,
                    )
                )
            for chunk in _chunks(requests, self._max_items_per_call):
                results = await sub.create_monitored_items(chunk)
                for req, res in zip(chunk, results, strict=True):
                    if isinstance(res, ua.StatusCode):
                        tag, _ = self._handles.pop(req.RequestedParameters.ClientHandle)
                        _, reason, code = quality_of(int(res.value))
                        failed.append(RawReading(tag, None, "bad", reason, code))
        except Exception as exc:
            raise _as_unavailable(map_error(exc, dev.endpoint)) from exc
        if failed:
            await sink(failed)

    async def _on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish loop awaits this for every Publish response (keep-alives
        too). Never raises: asyncua would only log it."""
        self._last_response = time.monotonic()
        try:
            batches = self._batches(result)
        except Exception as exc:  # a reading we cannot convert must not stop the loop
            log.error("driver.publish.unreadable", device=self.device.name, error=repr(exc))
            return
        for i, item in enumerate(batches):
            self.stats.received += len(item[1])
            if self._outbox.full():
                self.stats.full_waits += 1
            self._waiting_for_room = True
            try:
                await self._outbox.put(item)
            except asyncio.CancelledError:
                # close() ended the publish loop while we waited: these were received
                # and are handed over by close(), not dropped.
                self._stranded.extend(batches[i:])
                raise
            finally:
                self._waiting_for_room = False
        # Waiting for our own consumer is not the server being silent.
        self._last_response = time.monotonic()

    def _batches(self, result: ua.PublishResult) -> list[tuple[SampleSink, list[RawReading]]]:
        data = result.NotificationMessage.NotificationData
        if not data:
            return []
        batches: dict[int, tuple[SampleSink, list[RawReading]]] = {}
        ts_choice = self.device.timestamp
        for notif in data:
            if isinstance(notif, ua.DataChangeNotification):
                for item in notif.MonitoredItems:
                    entry = self._handles.get(item.ClientHandle)
                    if entry is None:
                        continue
                    tag, sink = entry
                    batch = batches.setdefault(id(sink), (sink, []))[1]
                    batch.append(reading_from_datavalue(tag, item.Value, ts_choice))
            elif isinstance(notif, ua.StatusChangeNotification):
                code = int(notif.Status.value)
                if code >> 30:
                    self._set_lost(
                        DriverUnavailable(
                            status_name(code), f"{self.device.endpoint}: subscription ended", code
                        )
                    )
        return list(batches.values())

    def _set_lost(self, reason: DriverUnavailable) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    async def _watch_publishing(self) -> None:
        """The staleness watchdog: no Publish response (data or keep-alive) for
        `stale_after_s` while we were not ourselves holding the loop back → lost."""
        period = max(0.05, self.stale_after_s / 4)
        while not self._lost.is_set():
            await asyncio.sleep(period)
            if self._waiting_for_room:
                continue
            silent = time.monotonic() - self._last_response
            if silent >= self.stale_after_s:
                self.stats.stale += 1
                log.warning(
                    "driver.subscription.stale",
                    device=self.device.name,
                    endpoint=self.device.endpoint,
                    silent_s=round(silent, 1),
                )
                self._set_lost(
                    DriverUnavailable(
                        "subscription stale",
                        f"{self.device.endpoint}: no publish response or keep-alive for "
                        f"{silent:.1f} s",
                        StatusCodes.BadTimeout,
                    )
                )
                return

    async def _deliver(self) -> None:
        while True:
            sink, batch = await self._outbox.get()
            try:
                await self._hand(sink, batch)
            finally:
                self._outbox.task_done()

    async def _hand(self, sink: SampleSink, batch: list[RawReading]) -> None:
        self._handing = len(batch)
        try:
            await sink(batch)
        except Exception as exc:
            self.stats.dropped += len(batch)
            log.error("driver.sink.failed", device=self.device.name, error=repr(exc), n=len(batch))
        else:
            self.stats.delivered += len(batch)
        self._handing = 0


def _as_unavailable(err: DriverError) -> DriverUnavailable:
    """During read/subscribe a security or login code cannot be a config problem of ours
    any more; only connect decides that. Everything else means the session is unusable."""
    if isinstance(err, DriverUnavailable):
        return err
    return DriverUnavailable(err.reason, err.detail, err.code)


async def read_once(device: OpcUaDevice, group: str = "default") -> list[RawReading]:
    """Connect, read one group, close (for `edge-agent` probes and tests)."""
    driver = OpcUaDriver(device)
    try:
        await driver.connect()
        return await driver.read(group)
    finally:
        await driver.close()


__all__ = [
    "OpcUaDriver",
    "convert_value",
    "map_error",
    "quality_of",
    "read_once",
    "reading_from_datavalue",
]
