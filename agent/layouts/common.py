"""What every JSON layout shares: the message head, gap notices, the samples of a record.

A layout turns one buffered record (or a slice of one, when the forwarder splits a record
to fit the broker's packet size) into MQTT messages. Layouts are pure and never do I/O:
they read the record through `agent.buffer.common.record_samples` (one dict per sample,
the decode entry point of the buffer's record format), and `lean` and `compact` also
through `agent.buffer.record.record_columns` (the same record by columns, no dict per
value), giving the same bytes either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from agent.buffer import Gap, Record
from agent.buffer.common import record_samples
from agent.schema import SAMPLE_FIELDS as SAMPLE_FIELDS  # re-exported for the layouts


class PayloadError(ValueError):
    """A record that cannot be turned into messages (its stored bytes are not a record of
    samples): no attempt will ever succeed, so the caller sets it aside."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Who publishes: agent.id and the optional site/area/line of the config."""

    agent: str
    site: str | None = None
    area: str | None = None
    line: str | None = None

    def fields(self) -> dict[str, str | None]:
        """The topic template fields (besides device and tag)."""
        return {"agent": self.agent, "site": self.site, "area": self.area, "line": self.line}


def gap_list(gaps: Sequence[Gap], epoch: str) -> list[dict[str, Any]]:
    """Gap notices as published; a gap of another epoch than the message's says which."""
    out = []
    for g in gaps:
        item: dict[str, Any] = {
            "first_seq": g.first_seq,
            "last_seq": g.last_seq,
            "count": g.count,
            "reason": g.reason,
        }
        if g.epoch and g.epoch != epoch:
            item["epoch"] = g.epoch
        out.append(item)
    return out


def finish(
    body: dict[str, Any],
    extra: list[dict[str, Any]],
    *,
    historical: bool,
    gaps: Sequence[Gap],
    epoch: str,
) -> bytes:
    """The end every JSON data message shares: `extra` when there is some, the historical
    flag, the gap notices; then the payload bytes."""
    if extra:
        body["extra"] = extra
    if historical:
        body["historical"] = True
    if gaps:
        body["gaps"] = gap_list(gaps, epoch)
    return orjson.dumps(body)


def samples_of(record: Record) -> list[dict[str, Any]]:
    """The samples of a record, or PayloadError naming the record."""
    try:
        samples: Any = record_samples(record.data)
    except ValueError as exc:
        raise PayloadError(f"record {record.id} ({record.device}): {exc}") from None
    bad = PayloadError(f"record {record.id} ({record.device}): not a list of samples")
    if not isinstance(samples, list) or not all(type(s) is dict for s in samples):
        raise bad
    try:
        tags = [s["tag"] for s in samples]
        seqs = [s["seq"] for s in samples]
    except KeyError:
        raise bad from None
    if set(map(type, tags)) - {str} or set(map(type, seqs)) - {int}:
        raise bad
    return samples


def seq_members(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`seq: [first, last]`, plus `seqs` (every sample's seq, in order) when the seqs are
    not consecutive: a consumer always knows each sample's exact seq."""
    return seq_members_of([s["seq"] for s in samples])


def seq_members_of(seqs: Sequence[int]) -> dict[str, Any]:
    """`seq_members` of the samples' seqs (a range when they are consecutive)."""
    first = seqs[0]
    out: dict[str, Any] = {"seq": [first, seqs[-1]]}
    if type(seqs) is not range and list(seqs) != list(range(first, first + len(seqs))):
        out["seqs"] = list(seqs)
    return out


def ts_members(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`ts`: the first sample's ts_agent; `ts_changes: [[i, ts], ...]`: from sample i on,
    ts_agent is ts (only when it changes within the message: records merged from several
    polls, subscription deliveries). Every sample's ts_agent is then said exactly, and
    once per poll, not once per sample."""
    return ts_members_of([s.get("ts_agent") for s in samples])


def ts_members_of(stamps: Sequence[Any]) -> dict[str, Any]:
    """`ts_members` of the samples' ts_agent values."""
    out: dict[str, Any] = {}
    if stamps[0] is not None:
        out["ts"] = stamps[0]
    if stamps.count(stamps[0]) != len(stamps):
        out["ts_changes"] = [
            [i, stamps[i]] for i in range(1, len(stamps)) if stamps[i] != stamps[i - 1]
        ]
    return out


def ts_of(samples: Sequence[Any], members: dict[str, Any]) -> list[Any]:
    """Each sample's ts_agent as `ts_members` says it (what a decoder reads)."""
    out = []
    current = members.get("ts")
    changes = iter(members.get("ts_changes") or ())
    nxt = next(changes, None)
    for i in range(len(samples)):
        if nxt is not None and nxt[0] == i:
            current = nxt[1]
            nxt = next(changes, None)
        out.append(current)
    return out


def extra_of(sample: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields of `sample` that differ from what the message implies (`defaults`),
    besides tag, value and seq, which every layout carries in its own way. A field the
    defaults do not know (a future one) is always carried."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if key in ("tag", "value", "seq"):
            continue
        if key in defaults:
            if value != defaults[key] or type(value) is not type(defaults[key]):
                out[key] = value
        else:
            out[key] = value
    for key in ("value", *defaults):
        if key not in sample:
            # A sample without a field the defaults imply (not made by agent.normalize):
            # say so, so the decoder does not invent it.
            out.setdefault("absent", []).append(key)
    return out
