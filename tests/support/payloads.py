"""Published messages → what they carry, through the reference decoder
(`agent.layouts.decode`), so that a test reads every JSON layout the same way."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from agent.layouts.decode import Decoded, Decoder
from agent.publish import Message
from agent.schema import BATCH_SCHEMA, BatchPayload


def decoded(messages: Iterable[Message | bytes], decoder: Decoder | None = None) -> list[Decoded]:
    """The data messages among `messages`, decoded in order (compact metadata is taken in
    by the decoder and not returned; messages of no layout, such as status, are left
    out)."""
    decoder = decoder or Decoder()
    out = []
    for m in messages:
        payload = m.payload if isinstance(m, Message) else m
        if _schema(payload) not in LAYOUT_SCHEMAS:
            continue  # status, device status, a test's own message
        d = decoder.decode(payload)
        if d.kind == "data":
            out.append(d)
    return out


#: The schemas of the JSON layouts' messages (data and compact metadata).
LAYOUT_SCHEMAS = frozenset(
    {
        "edge-agent/batch/1",
        "edge-agent/batch/2",
        "edge-agent/sample/1",
        "edge-agent/compact/1",
        "edge-agent/meta/1",
    }
)


def _schema(payload: bytes) -> object:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return body.get("schema") if isinstance(body, dict) else None


def as_batch(d: Decoded) -> BatchPayload:
    """A decoded message as the verbose batch model (validates every sample's fields)."""
    body: dict[str, Any] = {
        "schema": BATCH_SCHEMA,
        "agent": d.agent,
        "epoch": d.epoch,
        "device": d.device,
        "samples": d.samples,
        "historical": d.historical,
        "gaps": d.gaps or None,
        **d.origin,
    }
    return BatchPayload.model_validate(body)


def batches(
    messages: Iterable[Message | bytes], decoder: Decoder | None = None
) -> list[BatchPayload]:
    """Every data message among `messages` as a BatchPayload, whatever its layout."""
    return [as_batch(d) for d in decoded(messages, decoder)]


def samples(
    messages: Iterable[Message | bytes], decoder: Decoder | None = None
) -> list[dict[str, Any]]:
    """Every sample the data messages among `messages` carry, in order."""
    return [s for d in decoded(messages, decoder) for s in d.samples]
