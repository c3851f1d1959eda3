"""Reference decoder of the agent's JSON layouts: a message → the samples it carries.

Copy this file into a consumer if you like: it needs nothing but the Python standard
library. Every layout (lean ``edge-agent/batch/2``, compact ``edge-agent/compact/1`` with
its metadata ``edge-agent/meta/1``, device ``edge-agent/batch/1``, tag
``edge-agent/sample/1``) decodes to the same sample dicts, with every field::

    {"device", "tag", "value", "quality", "reason", "code", "ts_source", "ts_agent",
     "unit", "seq"}  (+ "value_text" where the value cannot be carried as JSON)

Timestamps stay the RFC 3339 strings of the payload. Use::

    decoder = Decoder()                      # keeps compact metadata between messages
    msg = decoder.decode(payload)            # bytes, str or an already parsed dict
    if msg.kind == "data":
        for s in msg.samples: ...            # + msg.agent, msg.epoch, msg.historical, msg.gaps

A compact data message whose metadata the decoder has not seen raises `MetaMissing`
(subscribe to the metadata topic too: it is retained, so it arrives on subscribing; keep
the message and decode it again once it did). Deduplicate on (agent, epoch, seq).
docs/layouts.md describes the layouts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DecodeError", "Decoded", "Decoder", "MetaMissing", "decode"]

_F32 = struct.Struct("<f")


class DecodeError(ValueError):
    """The payload is not a message of a known layout, or is inconsistent."""


class MetaMissing(DecodeError):
    """A compact data message whose metadata (agent, device, meta) is not known yet."""

    def __init__(self, agent: str, device: str, meta: str) -> None:
        super().__init__(f"metadata {meta!r} of {agent}/{device} not received yet")
        self.agent = agent
        self.device = device
        self.meta = meta


@dataclass
class Decoded:
    """One decoded message. kind "meta": a compact metadata message (no samples)."""

    kind: str  # "data" or "meta"
    schema: str
    agent: str
    epoch: str | None
    device: str | None
    samples: list[dict[str, Any]] = field(default_factory=list)
    historical: bool = False
    gaps: list[dict[str, Any]] = field(default_factory=list)
    meta: str | None = None  # compact: the metadata id the message uses or declares
    #: site, area, line where the message names them
    origin: dict[str, str] = field(default_factory=dict)


def _float32(v: Any) -> Any:
    if isinstance(v, float):
        return _F32.unpack(_F32.pack(v))[0]
    return v


def _need(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise DecodeError(f"member {key!r} missing or of the wrong type")
    return value


def _seqs(body: dict[str, Any], n: int) -> list[int]:
    seqs = body.get("seqs")
    if seqs is None:
        first, last = _need(body, "seq", list)
        seqs = list(range(first, last + 1))
    if len(seqs) != n:
        raise DecodeError(f"{len(seqs)} seqs for {n} samples")
    return list(seqs)


def _stamps(body: dict[str, Any], n: int) -> list[Any]:
    """Each sample's ts_agent: `ts`, changed from sample i on by `ts_changes` [[i, ts]]."""
    out = []
    current = body.get("ts")
    changes = iter(body.get("ts_changes") or ())
    nxt = next(changes, None)
    for i in range(n):
        if nxt is not None and nxt[0] == i:
            current = nxt[1]
            nxt = next(changes, None)
        out.append(current)
    if nxt is not None:
        raise DecodeError(f"ts_changes entry {nxt!r} outside the message's samples")
    return out


def _apply_extra(samples: list[dict[str, Any]], extra: list[dict[str, Any]], key: str) -> None:
    for x in extra:
        n = x[key]
        if not isinstance(n, int) or not 0 <= n < len(samples):
            raise DecodeError(f"extra entry {key}={n!r} outside the message's samples")
        s = samples[n]
        for k, v in x.items():
            if k == key:
                continue
            if k == "absent":
                for gone in v:
                    s.pop(gone, None)
            else:
                s[k] = v


def _common(body: dict[str, Any], kind: str) -> Decoded:
    return Decoded(
        kind=kind,
        schema=body["schema"],
        agent=_need(body, "agent", str),
        epoch=body.get("epoch"),
        device=body.get("device"),
        historical=body.get("historical", False) is True,
        gaps=list(body.get("gaps") or []),
        meta=body.get("meta"),
        origin={k: body[k] for k in ("site", "area", "line") if isinstance(body.get(k), str)},
    )


class Decoder:
    """Decodes messages of every JSON layout; remembers compact metadata it has seen."""

    def __init__(self) -> None:
        #: (agent, device, meta id) → entries [{"tag", "type"?, "unit"?}, ...]
        self.meta: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._parts: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}

    def decode(self, payload: bytes | str | dict[str, Any]) -> Decoded:
        if isinstance(payload, dict):
            body = payload
        else:
            try:
                body = json.loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise DecodeError("not a message of the agent: no 'schema' member")
        schema = body["schema"]
        try:
            if schema == "edge-agent/batch/2":
                return self._lean(body)
            if schema == "edge-agent/compact/1":
                return self._compact(body)
            if schema == "edge-agent/meta/1":
                return self._meta(body)
            if schema == "edge-agent/batch/1":
                out = _common(body, "data")
                out.samples = [dict(s) for s in _need(body, "samples", list)]
                return out
            if schema == "edge-agent/sample/1":
                out = _common(body, "data")
                s = {
                    k: v
                    for k, v in body.items()
                    if k not in ("schema", "agent", "epoch", "historical", "gaps")
                }
                out.device = s.get("device")
                out.samples = [s]
                return out
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DecodeError(f"{schema}: malformed: {type(exc).__name__}: {exc}") from None
        raise DecodeError(f"unknown schema {schema!r}")

    def _lean(self, body: dict[str, Any]) -> Decoded:
        out = _common(body, "data")
        device = _need(body, "device", str)
        tags = _need(body, "tags", list)
        values = _need(body, "values", list)
        if len(values) != len(tags):
            raise DecodeError(f"{len(values)} values for {len(tags)} tags")
        seqs = _seqs(body, len(tags))
        stamps = _stamps(body, len(tags))
        units = body.get("units") or {}
        out.samples = [
            {
                "device": device,
                "tag": tag,
                "value": value,
                "quality": "good",
                "reason": None,
                "code": None,
                "ts_source": None,
                "ts_agent": ts,
                "unit": units.get(tag),
                "seq": seq,
            }
            for tag, value, seq, ts in zip(tags, values, seqs, stamps, strict=True)
        ]
        _apply_extra(out.samples, body.get("extra") or [], "i")
        return out

    def _compact(self, body: dict[str, Any]) -> Decoded:
        out = _common(body, "data")
        device = _need(body, "device", str)
        meta_id = _need(body, "meta", str)
        entries = self.meta.get((out.agent, device, meta_id))
        if entries is None:
            raise MetaMissing(out.agent, device, meta_id)
        values = _need(body, "v", list)
        at = body.get("i", 0)
        positions = list(at) if isinstance(at, list) else list(range(at, at + len(values)))
        if len(positions) != len(values):
            raise DecodeError(f"{len(positions)} indexes for {len(values)} values")
        seqs = _seqs(body, len(values))
        stamps = _stamps(body, len(values))
        samples = []
        for n, value, seq, ts in zip(positions, values, seqs, stamps, strict=True):
            if not 0 <= n < len(entries):
                raise DecodeError(f"index {n} outside metadata {meta_id!r}")
            entry = entries[n]
            samples.append(
                {
                    "device": device,
                    "tag": entry["tag"],
                    "value": _float32(value) if entry.get("type") == "float32" else value,
                    "quality": "good",
                    "reason": None,
                    "code": None,
                    "ts_source": None,
                    "ts_agent": ts,
                    "unit": entry.get("unit"),
                    "seq": seq,
                }
            )
        out.samples = samples
        _apply_extra(samples, body.get("extra") or [], "n")
        return out

    def _meta(self, body: dict[str, Any]) -> Decoded:
        out = _common(body, "meta")
        device = _need(body, "device", str)
        meta_id = _need(body, "meta", str)
        tags = _need(body, "tags", list)
        key = (out.agent, device, meta_id)
        parts = body.get("parts", 1)
        if parts == 1:
            self.meta[key] = tags
            return out
        got = self._parts.setdefault(key, {})
        got[body["part"]] = body
        if len(got) == parts:
            entries: list[dict[str, Any]] = []
            for k in range(parts):
                part = got[k]
                if part["first"] != len(entries):
                    raise DecodeError(f"metadata {meta_id!r}: part {k} does not follow on")
                entries.extend(part["tags"])
            self.meta[key] = entries
            del self._parts[key]
        return out


def decode(payload: bytes | str | dict[str, Any], decoder: Decoder | None = None) -> Decoded:
    """Decode one message (with a fresh Decoder unless one is given: compact data then
    needs its metadata decoded by the same Decoder first)."""
    return (decoder or Decoder()).decode(payload)
