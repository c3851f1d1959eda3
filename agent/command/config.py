"""The `commands:` section: writes from the platform, off unless enabled (docs/commands.md).

Tag-level settings (`writable: true`, `write:` limits) are in drivers.base.TagCommon."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from drivers.base import ConfigModel

_TOPIC_FIELD = re.compile(r"\{([^{}]*)\}")


def _check_topic(template: str) -> str:
    if not template:
        raise ValueError("the topic is empty")
    for ch, what in (("+", "'+' (an MQTT wildcard)"), ("#", "'#' (an MQTT wildcard)")):
        if ch in template:
            raise ValueError(f"{template!r}: {what} is not allowed in a topic")
    if template.startswith("$"):
        raise ValueError(f"{template!r}: topics starting with '$' are reserved for the broker")
    for name in _TOPIC_FIELD.findall(template):
        if name != "agent":
            raise ValueError(f"{template!r}: unknown field {{{name}}}; allowed: {{agent}}")
    if template.count("{") != template.count("}"):
        raise ValueError(f"{template!r}: unbalanced braces")
    return template


class SigningConfig(ConfigModel):
    """HMAC-SHA256 signatures on command requests: unsigned, wrongly signed, stale or
    future-dated requests are refused."""

    key_file: str = Field(
        description="File holding the shared key (its bytes, one trailing newline ignored); "
        "must not be readable by group or others."
    )
    window_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A request's `ts` may be at most this many seconds old (or ahead).",
    )
    signer: str = Field(
        default="platform",
        min_length=1,
        description="Name recorded in the audit log as who signed a request.",
    )


class AuditConfig(ConfigModel):
    """The local audit log: one JSON line per request and per write result, fsync'ed."""

    path: str = Field(default="data/audit.jsonl", description="Audit log file (JSON lines).")
    max_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=4096,
        description="Size at which the file is rotated (renamed to PATH.1, PATH.2, ...).",
    )
    keep: int = Field(default=10, ge=1, le=1000, description="Rotated files kept.")


class CommandsConfig(ConfigModel):
    """Writes from the platform (MQTT 5 request/response, Sparkplug DCMD)."""

    enabled: bool = Field(
        default=False,
        description="Accept writes at all (commands and `edge-agent write`). Off by default.",
    )
    topic: str = Field(
        default="edge-cmd/{agent}/write",
        description="Topic the agent subscribes for write requests; field {agent}.",
    )
    result_topic: str = Field(
        default="edge-cmd/{agent}/result",
        description="Where results go for a request without an MQTT 5 response topic.",
    )
    audit_topic: str = Field(
        default="edge-audit/{agent}",
        description="Every audit record is also published here (QoS 1, not retained).",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Longest a request may take from arrival to result (waiting for the "
        "device's poll, interlock and previous-value reads, the write, the read-back).",
    )
    remember: int = Field(
        default=10_000,
        ge=1,
        description="Correlation ids whose results are remembered (a repeated id gets the "
        "first result again); restored from the audit log at start.",
    )
    max_pending: int = Field(
        default=100, ge=1, description="Requests being handled at once; more are refused."
    )
    signing: SigningConfig | None = Field(
        default=None, description="Require HMAC-signed requests; off when absent."
    )
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("topic", "result_topic", "audit_topic")
    @classmethod
    def _topics(cls, value: str) -> str:
        return _check_topic(value)

    def expand(self, template: str, agent: str) -> str:
        return template.replace("{agent}", agent)
