"""A write request as it arrives, checked for shape: MQTT 5 JSON or a Sparkplug DCMD.

MQTT 5 (the agent's command topic), payload JSON:

    {"device": "press1", "tag": "setpoint", "value": 42.5, "ts": "2026-12-01T11:00:00Z"}

with the MQTT 5 properties response topic (where the result goes), correlation data
(the request's id: required; idempotency is by it) and optional user properties
``client_id`` and ``user`` (recorded as who sent it) and ``signature`` (agent.command.signing).
``ts`` is ISO 8601 with a time zone, or Unix seconds; required when signing is on.

Sparkplug B: a DCMD on ``spBv1.0/{group}/DCMD/{edge node}/{device}``, one write per
metric (by name, or by the alias its DBIRTH gave), decoded with agent.publish.sparkplug_wire.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from agent.command.guards import Refusal
from agent.publish import Incoming
from agent.publish.sparkplug_wire import decode_command

Channel = Literal["mqtt", "sparkplug", "cli"]

_KEYS = {"device", "tag", "value", "ts"}


@dataclass(frozen=True, slots=True)
class Origin:
    """Who sent a request, as far as the agent can tell (docs/commands.md, "Security")."""

    channel: Channel
    client_id: str | None = None
    user: str | None = None
    signer: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "channel": self.channel,
            "client_id": self.client_id,
            "user": self.user,
            "signer": self.signer,
        }


@dataclass(slots=True)
class WriteRequest:
    """One write of one tag. `problem` is set when the request is malformed (it is then
    refused with it, and audited like any other)."""

    device: str | None
    tag: str | None
    value: object
    origin: Origin
    correlation: bytes | None = None
    response_topic: str | None = None
    sent_at: float | None = None
    payload: bytes = b""
    signature: str | None = None
    problem: Refusal | None = None
    topic: str | None = None
    received_at: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


def _invalid(text: str) -> Refusal:
    return Refusal("invalid_request", text)


def parse_ts(value: object) -> float | None:
    """Unix seconds of a request's `ts`. Raises ValueError."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("'ts' must be ISO 8601 text or Unix seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("'ts' is not a finite number")
        return float(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'ts' {value!r} is not an ISO 8601 time") from None
        if dt.utcoffset() is None:
            raise ValueError(f"'ts' {value!r} has no time zone (add Z or +00:00)")
        return dt.timestamp()
    raise ValueError("'ts' must be ISO 8601 text or Unix seconds")


def parse_mqtt(msg: Incoming) -> WriteRequest:
    """A request from the command topic (never raises: a bad one carries `problem`)."""
    props = dict(msg.user_properties)
    origin = Origin("mqtt", client_id=props.get("client_id"), user=props.get("user"))
    req = WriteRequest(
        None,
        None,
        None,
        origin,
        correlation=msg.correlation_data,
        response_topic=msg.response_topic,
        payload=msg.payload,
        signature=props.get("signature"),
        topic=msg.topic,
    )
    try:
        data = json.loads(msg.payload)
    except (ValueError, UnicodeDecodeError) as exc:
        req.problem = _invalid(f"the payload is not JSON: {exc}")
        return req
    if not isinstance(data, dict):
        req.problem = _invalid("the payload must be a JSON object with device, tag, value")
        return req
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        req.problem = _invalid(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_KEYS))})")
        return req
    for key in ("device", "tag", "value"):
        if key not in data:
            req.problem = _invalid(f"'{key}' is missing")
            return req
    for key in ("device", "tag"):
        if not isinstance(data[key], str):
            req.problem = _invalid(f"'{key}' must be text")
            return req
    req.device, req.tag, req.value = data["device"], data["tag"], data["value"]
    if not isinstance(req.value, bool | int | float | str):
        req.problem = _invalid("'value' must be a number, true/false or text")
        return req
    try:
        req.sent_at = parse_ts(data.get("ts"))
    except ValueError as exc:
        req.problem = _invalid(str(exc))
    return req


def parse_dcmd(
    topic: str, payload: bytes, alias_name: Callable[[str, int], str | None]
) -> list[WriteRequest]:
    """The writes of a Sparkplug DCMD: one request per metric. `alias_name(device,
    alias)` resolves a metric sent by alias (the node's DBIRTH aliases)."""
    parts = topic.split("/")
    device = parts[4] if len(parts) == 5 else None
    origin = Origin("sparkplug")
    try:
        metrics = decode_command(payload)
    except ValueError as exc:
        return [
            WriteRequest(
                device,
                None,
                None,
                origin,
                payload=payload,
                topic=topic,
                problem=_invalid(f"the DCMD payload does not decode: {exc}"),
            )
        ]
    if device is None:
        return [
            WriteRequest(
                None, None, None, origin, topic=topic, problem=_invalid("not a DCMD topic")
            )
        ]
    out = []
    for m in metrics:
        name = m.name
        if name is None and m.alias is not None:
            name = alias_name(device, m.alias)
        req = WriteRequest(device, name, m.data, origin, payload=payload, topic=topic)
        if name is None:
            req.problem = _invalid(f"metric alias {m.alias} is not one this node declared")
        elif m.data is None:
            req.problem = _invalid(f"metric {name!r} carries no value")
        out.append(req)
    if not out:
        out.append(
            WriteRequest(
                device, None, None, origin, topic=topic, problem=_invalid("the DCMD has no metrics")
            )
        )
    return out
