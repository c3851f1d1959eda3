"""Layout `lean` (the default, schema ``edge-agent/batch/2``): one message per record,
everything said once.

    {"schema": "edge-agent/batch/2", "agent": ..., "epoch": ..., "device": ...,
     "ts": <ts_agent>, "seq": [first, last], "tags": [...], "values": [...],
     "units": {tag: unit}, "extra": [{"i": n, ...}], "historical": true, "gaps": [...]}

Sample ``i`` is ``tags[i]`` = ``values[i]`` with seq ``seq[0] + i`` (or ``seqs[i]`` when the
record's seqs are not consecutive), ts_agent ``ts`` (or the last ``ts_changes`` entry
``[j, ts]`` with j <= i, when the message holds several polls), quality good, its tag's unit from
``units``, and no ts_source, reason or code — except where ``extra`` (sparse, by index)
says otherwise: quality/reason/code of a sample that is not good, value_text, ts_source,
a ts_agent of its own. No member is null: what is absent takes its default
(docs/layouts.md; `agent.layouts.decode` is the reference decoder).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from agent.buffer import Gap
from agent.buffer.record import RecordColumns
from agent.layouts.common import (
    SAMPLE_FIELDS,
    extra_of,
    finish,
    seq_members,
    seq_members_of,
    ts_members,
    ts_members_of,
    ts_of,
)

SCHEMA = "edge-agent/batch/2"

_PLAIN = frozenset(SAMPLE_FIELDS)
#: The fields of a sample that carries nothing beyond tag and value (quality good, no
#: reason, code or ts_source, the message's device), read at C speed.
_COMMON = itemgetter("quality", "reason", "code", "ts_source", "device")


def encode(
    head: dict[str, Any],
    device: str,
    epoch: str,
    samples: Sequence[dict[str, Any]],
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes:
    """The payload of one message carrying `samples` (one device's, seq order).

    `head`: schema, agent and the optional site/area/line (no nulls)."""
    stamps = ts_members(samples)
    ts_list = ts_of(samples, stamps) if "ts_changes" in stamps else None
    ts = stamps.get("ts")
    tags = [s["tag"] for s in samples]
    units: dict[str, Any] = {}
    if len(set(tags)) == len(tags):
        units = {s["tag"]: s["unit"] for s in samples if s.get("unit") is not None}
    else:  # a tag more than once (merged polls): its unit is the first one's
        for s in samples:
            unit = s.get("unit")
            if unit is not None and s["tag"] not in units:
                units[s["tag"]] = unit
    common = ("good", None, None, None, device)
    odd = {i for i, s in enumerate(samples) if s.keys() != _PLAIN or _COMMON(s) != common}
    actual = [s.get("unit") for s in samples]
    implied = [units.get(t) for t in tags]
    if actual != implied:
        odd |= {i for i, (a, b) in enumerate(zip(actual, implied, strict=True)) if a != b}
    body: dict[str, Any] = {**head, "epoch": epoch, "device": device}
    body.update(stamps)
    body.update(seq_members(samples))
    body["tags"] = tags
    body["values"] = [s.get("value") for s in samples]
    if units:
        body["units"] = units
    extra = _extra(odd, samples.__getitem__, device, ts, ts_list, units)
    return finish(body, extra, historical=historical, gaps=gaps, epoch=epoch)


def encode_columns(
    head: dict[str, Any],
    device: str,
    epoch: str,
    cols: RecordColumns,
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes | None:
    """`encode` of a record read by columns (`agent.buffer.record.record_columns`): the
    same bytes as `encode` of its sample dicts, without making them. None when the record
    is one the columns cannot say as cheaply (a tag twice, another device's samples):
    then `encode` of the dicts is the answer."""
    tags = list(cols.tags)
    if cols.device != device or len(set(tags)) != len(tags):
        return None
    if cols.ts_agent_single is not None:
        stamps: dict[str, Any] = {"ts": cols.ts_agent_single}
        ts_list = None
    else:
        stamps = ts_members_of(cols.ts_agent)
        ts_list = ts_of(cols.ts_agent, stamps) if "ts_changes" in stamps else None
    ts = stamps.get("ts")
    units = {t: u for t, u in zip(tags, cols.units, strict=True) if u is not None}
    odd = set(cols.not_good) | set(cols.value_text)
    if cols.ts_source is not None:
        odd.update(i for i, src in enumerate(cols.ts_source) if src is not None)
    body: dict[str, Any] = {**head, "epoch": epoch, "device": device}
    body.update(stamps)
    body.update(seq_members_of(cols.seqs))
    body["tags"] = tags
    body["values"] = list(cols.values)
    if units:
        body["units"] = units
    extra = _extra(odd, cols.sample, device, ts, ts_list, units)
    return finish(body, extra, historical=historical, gaps=gaps, epoch=epoch)


def _extra(
    odd: set[int],
    sample_at: Callable[[int], dict[str, Any]],
    device: str,
    ts: Any,
    ts_list: list[Any] | None,
    units: dict[str, Any],
) -> list[dict[str, Any]]:
    """`extra`: what samples `odd` say beyond what the message implies."""
    extra = []
    for i in sorted(odd):
        s = sample_at(i)
        defaults = {
            "device": device,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": ts if ts_list is None else ts_list[i],
            "unit": units.get(s["tag"]),
        }
        x = extra_of(s, defaults)
        if x:
            extra.append({"i": i, **x})
    return extra
