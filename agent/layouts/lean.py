"""Layout `lean` (the default, schema ``edge-agent/batch/2``): one message per record,
everything said once.

    {"schema": "edge-agent/batch/2", "agent": ..., "epoch": ..., "device": ...,
     "ts": <ts_agent>, "seq": [first, last], "tags": [...], "values": [...],
     "units": {tag: unit}, "extra": [{"i": n, ...}], "historical": true, "gaps": [...]}

Sample ``i`` is ``tags[i]`` = ``values[i]`` with seq ``seq[0] + i`` (or ``seqs[i]`` when the
record's seqs are not consecutive), ts_agent ``ts``, quality good, its tag's unit from
``units``, and no ts_source, reason or code — except where ``extra`` (sparse, by index)
says otherwise: quality/reason/code of a sample that is not good, value_text, ts_source,
a ts_agent of its own. No member is null: what is absent takes its default
(docs/layouts.md; `agent.layouts.decode` is the reference decoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from agent.buffer import Gap
from agent.layouts.common import SAMPLE_FIELDS, extra_of, gap_list, seq_members

SCHEMA = "edge-agent/batch/2"

_PLAIN = frozenset(SAMPLE_FIELDS)


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
    ts = samples[0].get("ts_agent")
    units: dict[str, Any] = {}
    for s in samples:
        unit = s.get("unit")
        if unit is not None and s["tag"] not in units:
            units[s["tag"]] = unit
    body: dict[str, Any] = {**head, "epoch": epoch, "device": device}
    if ts is not None:
        body["ts"] = ts
    body.update(seq_members(samples))
    body["tags"] = [s["tag"] for s in samples]
    body["values"] = [s.get("value") for s in samples]
    if units:
        body["units"] = units
    extra = []
    for i, s in enumerate(samples):
        if (
            s.keys() == _PLAIN
            and s["quality"] == "good"
            and s["reason"] is None
            and s["code"] is None
            and s["ts_source"] is None
            and s["ts_agent"] == ts
            and s["device"] == device
            and s["unit"] == units.get(s["tag"])
        ):
            continue  # the common case: nothing to say beyond tag and value
        defaults = {
            "device": device,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": ts,
            "unit": units.get(s["tag"]),
        }
        x = extra_of(s, defaults)
        if x:
            extra.append({"i": i, **x})
    if extra:
        body["extra"] = extra
    if historical:
        body["historical"] = True
    if gaps:
        body["gaps"] = gap_list(gaps, epoch)
    return orjson.dumps(body)
