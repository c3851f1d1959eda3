"""What `validate` (and so `run`) refuses about writes, beyond the fields' own checks.

Called by agent.config with every device and the broker settings; each problem is a
(location, message) pair, reported with file:line like every other config error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.command.config import CommandsConfig
from agent.command.convert import ConversionError, engineering_range, raw_type, to_raw
from agent.command.signing import KeyProblem, read_key
from drivers.base import DeviceCommon, TagCommon

Problem = tuple[tuple[Any, ...], str]


@dataclass(frozen=True, slots=True)
class Broker:
    """What the checks need to know of the agent's broker session."""

    tls: bool
    authenticated: bool  # a user name or a client certificate
    mqtt5: bool
    sparkplug: bool


def _tag_problems(device: DeviceCommon, tag: TagCommon) -> list[tuple[tuple[Any, ...], str]]:
    out: list[tuple[tuple[Any, ...], str]] = []
    refusal = device.write_refusal(tag.name)
    if refusal is not None:
        out.append((("writable",), f"tag {tag.name!r} cannot be written: {refusal}"))
        return out
    t = raw_type(tag)
    if t is None:
        shown = getattr(tag, "type", None)
        out.append((("writable",), f"type {shown} cannot be written"))
        return out
    if t.kind in ("int", "float", "any") and tag.scale == 0:
        out.append((("scale",), "scale 0 cannot be inverted for writes (writable: true)"))
        return out
    spec = tag.write
    if spec is None:
        return out
    numeric = t.kind in ("int", "float")
    for key in ("min", "max", "max_step"):
        value = getattr(spec, key)
        if value is None:
            continue
        if not math.isfinite(value):
            out.append((("write", key), f"{value!r} is not a finite number"))
        elif not numeric and t.kind != "any":
            out.append((("write", key), f"{key} is for numeric tags; this one is {t.name}"))
    if spec.tolerance and not numeric and t.kind != "any":
        out.append((("write", "tolerance"), f"tolerance is for numeric tags; this one is {t.name}"))
    bounds = engineering_range(t, tag.scale, tag.offset)
    if bounds is not None:
        lo, hi = bounds
        for key in ("min", "max"):
            value = getattr(spec, key)
            if value is not None and math.isfinite(value) and not lo <= value <= hi:
                out.append(
                    (
                        ("write", key),
                        f"{value:g} is outside what {t.name} can hold with this scale and "
                        f"offset ({lo:g} .. {hi:g})",
                    )
                )
    for n, allowed in enumerate(spec.allowed or []):
        try:
            to_raw(allowed, t, tag.scale, tag.offset)
        except ConversionError as exc:
            out.append((("write", "allowed", n), f"{exc.text}"))
            continue
        numeric_value = isinstance(allowed, int | float) and not isinstance(allowed, bool)
        if numeric_value and (
            (spec.min is not None and allowed < spec.min)  # type: ignore[operator]
            or (spec.max is not None and allowed > spec.max)  # type: ignore[operator]
        ):
            out.append((("write", "allowed", n), f"{allowed!r} is outside min .. max"))
    if spec.interlock is not None:
        names = {t2.name for t2 in getattr(device, "tags", [])}
        if spec.interlock not in names:
            out.append(
                (
                    ("write", "interlock"),
                    f"interlock {spec.interlock!r} names no tag of device {device.name!r}",
                )
            )
        elif spec.interlock == tag.name:
            out.append((("write", "interlock"), "a tag cannot be its own interlock"))
    return out


def command_problems(
    commands: CommandsConfig | None,
    devices: Sequence[tuple[int, DeviceCommon]],
    broker: Broker | None,
    simulate: bool | None,
) -> list[Problem]:
    """Every problem of the writes in a config (see the module docstring)."""
    out: list[Problem] = []
    for i, device in devices:
        for j, tag in enumerate(getattr(device, "tags", [])):
            if tag.writable:
                out.extend(
                    (("devices", i, "tags", j, *loc), m) for loc, m in _tag_problems(device, tag)
                )
    if commands is None:
        return out
    topics = {commands.topic: "topic", commands.result_topic: "result_topic"}
    if commands.audit_topic in topics:
        out.append(
            (
                ("commands", "audit_topic"),
                f"the same topic as commands.{topics[commands.audit_topic]}",
            )
        )
    if commands.result_topic == commands.topic:
        out.append((("commands", "result_topic"), "the same topic as commands.topic"))
    if not commands.enabled:
        return out
    if broker is not None and simulate is False:
        if not broker.tls:
            out.append(
                (
                    ("commands", "enabled"),
                    "commands need a TLS broker connection (mqtt.tls); plaintext is "
                    "allowed only in simulator mode",
                )
            )
        if not broker.authenticated:
            out.append(
                (
                    ("commands", "enabled"),
                    "commands need an authenticated broker session: set mqtt.username "
                    "(and password) or a client certificate (mqtt.tls.cert_file)",
                )
            )
    if broker is not None and not broker.mqtt5 and not broker.sparkplug:
        # Sparkplug DCMD needs no MQTT 5 properties; the JSON requests do.
        out.append(
            (
                ("commands", "enabled"),
                "commands need MQTT 5 (request/response properties): mqtt.protocol '5'",
            )
        )
    if commands.signing is not None:
        try:
            read_key(commands.signing.key_file)
        except KeyProblem as exc:
            out.append((("commands", "signing", "key_file"), str(exc)))
    return out
