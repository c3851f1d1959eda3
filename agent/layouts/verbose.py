"""Layouts `device` (schema ``edge-agent/batch/1``) and `tag` (``edge-agent/sample/1``):
every sample as a full object, as published before layout lean became the default.

device: one message per record, ``{"schema", "agent", "epoch", "site", "area", "line",
"device", "samples": [<Sample>...], "historical"?, "gaps"?}``. tag: one message per
sample on its own topic, ``{"schema", "agent", "epoch", <Sample fields>, "historical"?,
"gaps"?}`` (gaps on the record's first message).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from agent.buffer import Gap
from agent.layouts.common import gap_list

DEVICE_SCHEMA = "edge-agent/batch/1"
TAG_SCHEMA = "edge-agent/sample/1"


def device_prefix(head: dict[str, Any], epoch: str, device: str) -> bytes:
    """The part of a device message before the samples (cached per device by callers)."""
    # Member order as before the layouts were split (some consumers diff raw payloads).
    body = {"schema": DEVICE_SCHEMA, "agent": head["agent"], "epoch": epoch, **head}
    body["device"] = device
    return orjson.dumps(body)[:-1] + b',"samples":'


def device_payload(
    prefix: bytes,
    epoch: str,
    samples: Sequence[dict[str, Any]],
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes:
    tail = b"}"
    if historical or gaps:
        extra: dict[str, Any] = {}
        if historical:
            extra["historical"] = True
        if gaps:
            extra["gaps"] = gap_list(gaps, epoch)
        tail = b"," + orjson.dumps(extra)[1:]
    return prefix + orjson.dumps(samples) + tail


def tag_payload(
    agent: str,
    epoch: str,
    sample: dict[str, Any],
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes:
    body: dict[str, Any] = {"schema": TAG_SCHEMA, "agent": agent, "epoch": epoch, **sample}
    if historical:
        body["historical"] = True
    if gaps:
        body["gaps"] = gap_list(gaps, epoch)
    return orjson.dumps(body)
