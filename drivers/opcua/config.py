"""Configuration of an OPC UA device and its tags (the `protocol: opcua` entries).

Pure pydantic: this module never imports asyncua (importing it costs ~0.4 s and 30 MB),
so a config without OPC UA devices never pays for it.

Addressing: a tag names its node either by `node_id` in the standard string form
(``ns=3;s=Oven.Temp``, ``ns=2;i=1001``, ``nsu=urn:acme:oven;s=Temp``, ``i=2258``) or by
`browse_path`, a slash-separated list of qualified names each prefixed by its namespace,
as an index or as a URI in braces: ``0:Objects/2:Oven/2:Temperature`` or
``0:Objects/{urn:acme:oven}Oven/{urn:acme:oven}Temperature``. Namespace URIs are resolved
and browse paths translated at every connect, since a server restart may renumber
namespaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from drivers.base import ConfigModel, DeviceCommon, PollGroup, TagCommon

SecurityPolicyName = Literal[
    "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"
]
SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]
Mode = Literal["poll", "subscribe"]
TimestampChoice = Literal["source", "server", "agent"]

# Built-in scalar types the simulator can serve (the `type` hint of a tag). The driver
# itself reads whatever type the server has; `type` only matters in simulator mode.
ScalarTypeName = Literal[
    "Boolean",
    "SByte",
    "Byte",
    "Int16",
    "UInt16",
    "Int32",
    "UInt32",
    "Int64",
    "UInt64",
    "Float",
    "Double",
    "String",
    "DateTime",
    "ByteString",
    "Guid",
    "LocalizedText",
]
TypeName = ScalarTypeName | Literal["Structure"]


# ------------------------------------------------------------------ node ids and paths


@dataclass(frozen=True, slots=True)
class ParsedNodeId:
    """A node id split into its parts; exactly one of `ns_index` and `ns_uri` is set."""

    ns_index: int | None
    ns_uri: str | None
    kind: Literal["i", "s", "g", "b"]
    identifier: str

    def with_index(self, index: int) -> str:
        """The node id string with the namespace as an index (`ns=2;s=Temp`)."""
        prefix = f"ns={index};" if index else ""
        return f"{prefix}{self.kind}={self.identifier}"


@dataclass(frozen=True, slots=True)
class PathElement:
    """One qualified name of a browse path."""

    ns_index: int | None
    ns_uri: str | None
    name: str


_NODE_ID = re.compile(
    r"^(?:(?:ns=(?P<ns>\d+)|nsu=(?P<nsu>[^;]+));)?(?P<kind>[isgb])=(?P<ident>.+)$", re.DOTALL
)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def parse_node_id(text: str) -> ParsedNodeId:
    """Parse `ns=3;s=...`, `ns=2;i=...`, `nsu=<uri>;s=...`, `i=85`, ... or raise ValueError."""
    m = _NODE_ID.match(text)
    if m is None:
        raise ValueError(
            f"node_id {text!r}: use ns=<index>;s=<name>, ns=<index>;i=<number>, "
            "nsu=<namespace uri>;s=<name> (also g=<guid>, b=<base64>)"
        )
    kind = m.group("kind")
    ident = m.group("ident")
    if kind == "i" and not ident.isdigit():
        raise ValueError(f"node_id {text!r}: i= needs a number")
    if kind == "i" and int(ident) > 0xFFFFFFFF:
        raise ValueError(f"node_id {text!r}: i= must fit in 32 bits")
    if kind == "g" and not _GUID.match(ident):
        raise ValueError(f"node_id {text!r}: g= needs a GUID")
    ns = m.group("ns")
    if ns is not None and int(ns) > 65535:
        raise ValueError(f"node_id {text!r}: namespace index must be at most 65535")
    return ParsedNodeId(
        ns_index=int(ns) if ns is not None else (None if m.group("nsu") else 0),
        ns_uri=m.group("nsu"),
        kind=kind,  # type: ignore[arg-type]  # the regex admits exactly these four
        identifier=ident,
    )


_ELEMENT = re.compile(r"^(?:(?P<ns>\d+):|\{(?P<uri>[^}]+)\})(?P<name>.+)$", re.DOTALL)


def parse_browse_path(text: str) -> list[PathElement]:
    """Parse `0:Objects/2:Oven/2:Temperature` (a URI in braces may replace an index)."""
    parts: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        if ch == "/" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    out: list[PathElement] = []
    for part in parts:
        m = _ELEMENT.match(part)
        if m is None:
            raise ValueError(
                f"browse_path {text!r}: element {part!r} must be <ns index>:<name> or "
                "{<namespace uri>}<name>, e.g. 0:Objects/2:Oven/2:Temperature"
            )
        ns = m.group("ns")
        out.append(
            PathElement(
                ns_index=int(ns) if ns is not None else None,
                ns_uri=m.group("uri"),
                name=m.group("name"),
            )
        )
    return out


# ----------------------------------------------------------------------- the models


class Deadband(ConfigModel):
    """Report a change only when it exceeds this band (server-side DataChangeFilter)."""

    type: Literal["absolute", "percent"] = Field(
        description="absolute: in the value's unit; percent: of the node's EURange."
    )
    value: float = Field(ge=0, description="Size of the band.")

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise ValueError("a percent deadband must be between 0 and 100")
        return self


class SubscriptionOptions(ConfigModel):
    """How a subscribed group's monitored items are set up."""

    sampling_interval_ms: float | None = Field(
        default=None,
        ge=0,
        description="How often the server samples each node; default: the group's interval.",
    )
    publishing_interval_ms: float | None = Field(
        default=None,
        gt=0,
        description="How often the server sends notifications; default: the group's interval.",
    )
    queue_size: int = Field(
        default=1,
        ge=1,
        le=10000,
        description="Values the server queues per node between publishes.",
    )
    deadband: Deadband | None = Field(default=None, description="Optional deadband filter.")


class OpcUaPollGroup(PollGroup):
    """A poll group of an OPC UA device: polled, or subscribed (monitored items)."""

    mode: Mode | None = Field(default=None, description="poll or subscribe; default: the device's.")
    subscription: SubscriptionOptions | None = Field(
        default=None, description="Subscription options; default: the device's."
    )


class OpcUaTag(TagCommon):
    """One variable node read from an OPC UA server."""

    node_id: str | None = Field(
        default=None, description="Node id: ns=3;s=..., ns=2;i=..., nsu=<uri>;s=..."
    )
    browse_path: str | None = Field(
        default=None,
        description="Browse path from the root, e.g. 0:Objects/2:Oven/2:Temperature.",
    )
    type: TypeName = Field(
        default="Double",
        description="Simulator mode only: the data type the simulator serves (the driver "
        "reads whatever type the server has).",
    )
    array_length: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="Simulator mode only: serve an array of this length.",
    )
    fields: dict[str, ScalarTypeName] | None = Field(
        default=None, description="Simulator mode only, type Structure: field name → type."
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str | None) -> str | None:
        if v is not None:
            parse_node_id(v)
        return v

    @field_validator("browse_path")
    @classmethod
    def _browse_path(cls, v: str | None) -> str | None:
        if v is not None:
            parse_browse_path(v)
        return v

    @model_validator(mode="after")
    def _one_address(self) -> OpcUaTag:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of node_id and browse_path")
        if self.type == "Structure" and not self.fields:
            raise ValueError("type Structure needs 'fields' (field name: type)")
        if self.type != "Structure" and self.fields is not None:
            raise ValueError("'fields' is only for type Structure")
        if self.type == "Structure" and self.array_length is not None:
            raise ValueError("arrays of structures are not supported by the simulator")
        return self

    @property
    def write_type(self) -> str | None:
        """The type the command layer converts a write to: the tag's `type` when the config
        names one (the node is declared of that type: a Float is rounded to float32 before
        it is written, so the read-back matches exactly); otherwise None, the node's own
        DataType, which the driver reads from the server (`type` then is only the
        simulator's default, Double). agent.command.convert: None = the device's type."""
        return self.type if "type" in self.model_fields_set else None

    @property
    def address(self) -> str:
        """The node id or browse path, whichever is configured (for messages)."""
        return self.node_id or self.browse_path or ""


_THUMBPRINT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class OpcUaDevice(DeviceCommon):
    """An OPC UA server reached over opc.tcp."""

    protocol: Literal["opcua"]
    endpoint: str = Field(
        pattern=r"^opc\.tcp://[^/\s:]+(:\d{1,5})?(/\S*)?$",
        description="Endpoint URL, e.g. opc.tcp://10.0.0.5:4840 (port 0 in simulator mode: "
        "any free port).",
    )
    security_policy: SecurityPolicyName = Field(
        default="None",
        description="None, Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss.",
    )
    security_mode: SecurityModeName | None = Field(
        default=None,
        description="Sign or SignAndEncrypt (default SignAndEncrypt when a policy is set; "
        "None when security_policy is None).",
    )
    username: str | None = Field(default=None, description="User name; anonymous when unset.")
    password: SecretStr | None = Field(
        default=None, description="Password; use ${ENV_VAR} rather than writing it here."
    )
    cert_dir: str = Field(
        default="pki",
        description="Directory of the client certificate (own/, generated once) and of the "
        "trusted server certificates (trusted/).",
    )
    server_certificate_thumbprint: str | None = Field(
        default=None,
        description="Trust the server certificate with this SHA-1 or SHA-256 thumbprint "
        "(hex, colons allowed) without copying it into the trust directory.",
    )
    application_uri: str = Field(
        default="urn:edge-agent:opcua-client",
        min_length=1,
        description="Client ApplicationUri; written into the generated certificate.",
    )
    mode: Mode = Field(default="poll", description="poll or subscribe (default of every group).")
    subscription: SubscriptionOptions = Field(
        default_factory=SubscriptionOptions, description="Default subscription options."
    )
    # A narrower type than DeviceCommon's (each group may choose poll or subscribe); the
    # group names and intervals stay where the shared code expects them.
    poll_groups: dict[str, OpcUaPollGroup] = Field(  # type: ignore[assignment]
        default_factory=dict, description="Extra poll groups by name, each with its interval."
    )
    timestamp: TimestampChoice = Field(
        default="source",
        description="Which time becomes ts_source: source (device), server, or agent (none).",
    )
    session_timeout_s: float = Field(
        default=60.0,
        ge=10,
        le=3600,
        description="Session timeout asked of the server; a lost session is freed after it.",
    )
    watchdog_interval_s: float = Field(
        default=5.0, gt=0, description="Seconds between keep-alive reads of the server state."
    )
    max_nodes_per_read: int | None = Field(
        default=None,
        ge=1,
        description="Cap on nodes per Read call, below the server's MaxNodesPerRead.",
    )
    max_monitored_items_per_call: int | None = Field(
        default=None,
        ge=1,
        description="Cap on monitored items per CreateMonitoredItems call.",
    )
    tags: list[OpcUaTag] = Field(min_length=1, description="The values to read.")

    @field_validator("server_certificate_thumbprint")
    @classmethod
    def _thumbprint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        norm = v.replace(":", "").replace(" ", "").lower()
        if not _THUMBPRINT.match(norm):
            raise ValueError("thumbprint must be 40 (SHA-1) or 64 (SHA-256) hex digits")
        return norm

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaDevice:
        if self.security_policy == "None" and self.security_mode not in (None, "None"):
            raise ValueError(
                f"security_mode {self.security_mode} needs a security_policy "
                "(Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss)"
            )
        if self.security_policy != "None" and self.security_mode == "None":
            raise ValueError(
                f"security_policy {self.security_policy} needs security_mode Sign or SignAndEncrypt"
            )
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither (anonymous)")
        return self

    def resolved_security_mode(self) -> SecurityModeName:
        """The message security mode actually used."""
        if self.security_policy == "None":
            return "None"
        return self.security_mode or "SignAndEncrypt"

    def group_mode(self, group: str) -> Mode:
        """poll or subscribe for poll group `group`."""
        g = self.poll_groups.get(group)
        return g.mode if g is not None and g.mode is not None else self.mode

    def group_subscription(self, group: str) -> SubscriptionOptions:
        """Subscription options of poll group `group`."""
        g = self.poll_groups.get(group)
        if g is not None and g.subscription is not None:
            return g.subscription
        return self.subscription

    def write_refusal(self, tag: str) -> str | None:
        """A tag configured as a structure or an array cannot be written (one write is
        one scalar); any other tag can be tried: the server's DataType, checked at the
        write, decides (drivers/opcua/README.md, Writes)."""
        found = next((t for t in self.tags if t.name == tag), None)
        if found is None:
            return f"no tag {tag!r} on device {self.name!r}"
        if found.type == "Structure":
            return "a structure cannot be written (one write is one scalar value)"
        if found.array_length is not None:
            return "an array cannot be written (one write is one scalar value)"
        return None

    def subscribe_groups(self) -> frozenset[str]:
        """Groups in subscribe mode: the driver pushes their values, nobody polls them."""
        groups = {t.group for t in self.tags}
        return frozenset(g for g in groups if self.group_mode(g) == "subscribe")

    def group_tags(self, group: str) -> list[OpcUaTag]:
        """The tags of poll group `group`, in config order."""
        return [t for t in self.tags if t.group == group]
