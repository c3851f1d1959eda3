"""Layout `compact` (schema ``edge-agent/compact/1`` + ``edge-agent/meta/1``): values by
index, for high-rate lines.

Data message (on ``mqtt.topic``)::

    {"schema": "edge-agent/compact/1", "agent": ..., "epoch": ..., "device": ...,
     "meta": "<id>", "ts": <ts_agent>, "seq": [first, last], "i": 0, "v": [...],
     "extra": [{"n": 3, ...}], "historical": true, "gaps": [...]}

Sample ``n`` of the message is entry ``i + n`` of the device's metadata ``<id>`` (or
``i[n]`` when ``i`` is a list; ``i`` absent means 0), value ``v[n]``, seq ``seq[0] + n``
(or ``seqs[n]``), ts_agent ``ts`` (or from ``ts_changes``), quality good, the entry's
unit — except where ``extra`` (sparse) says otherwise, as in layout lean. A value of a
``float32`` entry is written with the fewest digits that give back the same float32
(``73.12346`` rather than ``73.12345886230469``); a consumer rounds it to float32 (the
reference decoder does).

Metadata message (retained, on ``mqtt.topic_meta``)::

    {"schema": "edge-agent/meta/1", "agent": ..., "device": ..., "meta": "<id>",
     "tags": [{"tag": "t0000", "type": "int", "unit": "kW"}, ...]}

``<id>`` is a hash of the entries: it changes whenever the mapping does. The entries of a
device only grow (a tag first seen is appended; a tag whose unit or type changes keeps
its index), so records of poll groups with different tags share one mapping. A mapping
larger than the packet limit is published in parts (``part``, ``parts``, ``first``: the
index of the part's first entry), each retained on a topic of its own. The metadata of a
device goes out before its first data message on every connection and whenever its
mapping changes; the record whose data needs it is deleted from the buffer only once the
metadata was acknowledged too.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from agent.buffer import Gap
from agent.buffer.record import RecordColumns
from agent.layouts.common import (
    SAMPLE_FIELDS,
    PayloadError,
    extra_of,
    finish,
    seq_members,
    seq_members_of,
    ts_members,
    ts_members_of,
    ts_of,
)

SCHEMA = "edge-agent/compact/1"
META_SCHEMA = "edge-agent/meta/1"

_PLAIN = frozenset(SAMPLE_FIELDS)
_COMMON = itemgetter("quality", "reason", "code", "ts_source", "device")
_F32 = struct.Struct("<f")


def float32_exact(v: float) -> bool:
    """True when v is a float32 value (what a float32 register holds, widened)."""
    try:
        return bool(_F32.unpack(_F32.pack(v))[0] == v)
    except (OverflowError, struct.error):
        return False


def float32_short(v: float) -> float:
    """The float64 nearest to the shortest decimal that rounds to float32 `v` (which must
    be float32-exact): orjson writes it with those few digits."""
    for digits in (6, 7, 8):
        short = float(f"{v:.{digits}g}")
        if _F32.unpack(_F32.pack(short))[0] == v:
            return short
    return float(f"{v:.9g}")  # 9 significant digits always give a float32 back


def value_type(value: Any) -> str | None:
    """The type an entry declares, from the first value that decides it (None: not
    known yet). Each entry's type changes at most once, from unknown to known."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        # float32 when the value looks widened from a float32 (shorter as one); float64
        # when it is no float32 at all. A value that is both and as short either way
        # (50.0, 20.5, 0.0) decides nothing: the type stays unknown until one does.
        if not float32_exact(value):
            return "float64"
        if len(repr(float32_short(value))) < len(repr(value)):
            return "float32"
        return None
    if isinstance(value, str):
        return "string"
    return "json"


@dataclass
class Mapping:
    """One device's index → (tag, type, unit), and its id."""

    entries: list[list[Any]] = field(default_factory=list)  # [tag, type, unit]
    index: dict[str, int] = field(default_factory=dict)
    id: str = ""
    #: What the last update saw (tags, units), and whether some type is not known yet:
    #: a poll like the last one changes nothing and is not looked at sample by sample.
    last: tuple[list[str], list[Any]] | None = None
    undecided: bool = False

    def update(self, samples: Sequence[dict[str, Any]]) -> bool:
        """Take in the tags of `samples`; True when the mapping changed. A tag's unit is
        the one of its first sample here; a type not known yet is taken from the first
        sample with a value."""
        tags = [s["tag"] for s in samples]
        units = [s.get("unit") for s in samples]
        if self._steady(tags, units):
            return False
        return self._take(tags, units, [s.get("value") for s in samples])

    def update_columns(
        self, tags: Sequence[str], units: Sequence[Any], values: Sequence[Any]
    ) -> bool:
        """`update` of a record read by columns (`agent.buffer.record.RecordColumns`)."""
        tag_list, unit_list = list(tags), list(units)
        if self._steady(tag_list, unit_list):
            return False
        return self._take(tag_list, unit_list, values)

    def _steady(self, tags: list[str], units: list[Any]) -> bool:
        """True when a poll like the last one changes nothing (not looked at by sample)."""
        seen_now = (tags, units)
        if seen_now == self.last and not self.undecided and self.id:
            return True
        self.last = seen_now
        return False

    def _take(self, tags: list[str], units: list[Any], values: Sequence[Any]) -> bool:
        changed = False
        seen: set[str] = set()
        for tag, unit, value in zip(tags, units, values, strict=True):
            n = self.index.get(tag)
            if n is None:
                self.index[tag] = len(self.entries)
                self.entries.append([tag, value_type(value), unit])
                seen.add(tag)
                changed = True
                continue
            entry = self.entries[n]
            if tag not in seen:
                seen.add(tag)
                if entry[2] != unit:
                    entry[2] = unit
                    changed = True
            if entry[1] is None and value is not None:
                decided = value_type(value)
                if decided is not None:
                    entry[1] = decided
                    changed = True
        self.undecided = any(entry[1] is None for entry in self.entries)
        if changed or not self.id:
            self.id = hashlib.sha256(orjson.dumps(self.entries)).hexdigest()[:16]
        return changed

    def covers_tags(self, tags: Sequence[str]) -> bool:
        """`covers` of the tags of a record read by columns."""
        return all(map(self.index.__contains__, tags))

    def covers(self, samples: Sequence[dict[str, Any]]) -> bool:
        """Every tag of `samples` has an entry (what encoding needs; units and types
        that differ are carried per sample)."""
        index = self.index
        return all(s["tag"] in index for s in samples)


def meta_payloads(
    head: dict[str, Any], device: str, mapping: Mapping, room: int | None
) -> list[tuple[str, bytes]]:
    """(topic suffix, payload) of the metadata messages: one, or parts each at most
    `room` bytes of payload. Raises PayloadError when one entry alone does not fit."""
    body: dict[str, Any] = {**head, "device": device, "meta": mapping.id}
    items = []
    for tag, type_, unit in mapping.entries:
        item: dict[str, Any] = {"tag": tag}
        if type_ is not None:
            item["type"] = type_
        if unit is not None:
            item["unit"] = unit
        items.append(item)
    whole = orjson.dumps({**body, "tags": items})
    if room is None or len(whole) <= room:
        return [(mapping.id, whole)]
    # Parts: greedy by the entries' encoded sizes, leaving room for part/parts/first.
    fixed = len(orjson.dumps({**body, "tags": [], "part": 99999, "parts": 99999, "first": 0}))
    fixed += 24  # the digits of `first` and commas
    chunks: list[tuple[int, list[dict[str, Any]]]] = []
    current: list[dict[str, Any]] = []
    first = size = 0
    for n, item in enumerate(items):
        item_size = len(orjson.dumps(item)) + 1
        if fixed + item_size > room:
            raise PayloadError(
                f"metadata entry of tag {item['tag']!r} ({item_size} bytes) does not fit "
                f"the packet limit"
            )
        if current and fixed + size + item_size > room:
            chunks.append((first, current))
            current, first, size = [], n, 0
        current.append(item)
        size += item_size
    chunks.append((first, current))
    return [
        (
            f"{mapping.id}-{k}",
            orjson.dumps({**body, "tags": part, "part": k, "parts": len(chunks), "first": at}),
        )
        for k, (at, part) in enumerate(chunks)
    ]


def encode(
    head: dict[str, Any],
    device: str,
    epoch: str,
    mapping: Mapping,
    samples: Sequence[dict[str, Any]],
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes:
    """The payload of one data message carrying `samples`; every tag must be in
    `mapping` (Mapping.update them first)."""
    stamps = ts_members(samples)
    index = mapping.index
    positions = [index[s["tag"]] for s in samples]
    values: list[Any] = [s.get("value") for s in samples]
    common = ("good", None, None, None, device)
    odd = {n for n, s in enumerate(samples) if s.keys() != _PLAIN or _COMMON(s) != common}
    units = [s.get("unit") for s in samples]
    return _message(
        head,
        device,
        epoch,
        mapping,
        stamps,
        seq_members(samples),
        positions,
        values,
        units,
        odd,
        samples.__getitem__,
        historical=historical,
        gaps=gaps,
    )


def encode_columns(
    head: dict[str, Any],
    device: str,
    epoch: str,
    mapping: Mapping,
    cols: RecordColumns,
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes | None:
    """`encode` of a record read by columns (`agent.buffer.record.record_columns`): the
    same bytes, without a dict per sample; every tag must be in `mapping`
    (`Mapping.update_columns` them first). None for a record of another device than
    `device` (then `encode` of its dicts is the answer)."""
    if cols.device != device:
        return None
    if cols.ts_agent_single is not None:
        stamps: dict[str, Any] = {"ts": cols.ts_agent_single}
    else:
        stamps = ts_members_of(cols.ts_agent)
    positions = list(map(mapping.index.__getitem__, cols.tags))
    odd = set(cols.not_good) | set(cols.value_text)
    if cols.ts_source is not None:
        odd.update(i for i, src in enumerate(cols.ts_source) if src is not None)
    return _message(
        head,
        device,
        epoch,
        mapping,
        stamps,
        seq_members_of(cols.seqs),
        positions,
        list(cols.values),
        list(cols.units),
        odd,
        cols.sample,
        historical=historical,
        gaps=gaps,
    )


def _message(
    head: dict[str, Any],
    device: str,
    epoch: str,
    mapping: Mapping,
    stamps: dict[str, Any],
    seqs: dict[str, Any],
    positions: list[int],
    values: list[Any],
    units: list[Any],
    odd: set[int],
    sample_at: Callable[[int], dict[str, Any]],
    *,
    historical: bool,
    gaps: Sequence[Gap],
) -> bytes:
    """A data message: `values` (changed here: float32 entries shortened, the values that
    are no float32 moved to extra), `odd` the samples that say more than the message
    implies (`sample_at(n)` gives sample n as a dict)."""
    ts_list = ts_of(positions, stamps) if "ts_changes" in stamps else None
    ts = stamps.get("ts")
    entries = mapping.entries
    # float32 entries: the fewest digits; a value that is no float32 goes to extra.
    moved: set[int] = set()
    for n, at in enumerate(positions):
        if entries[at][1] == "float32":
            value = values[n]
            if value is None:
                continue
            if type(value) is float and float32_exact(value):
                values[n] = float32_short(value)
            else:
                moved.add(n)
                values[n] = None
    odd |= moved
    expected = [entries[at][2] for at in positions]
    if units != expected:
        odd |= {n for n, (a, b) in enumerate(zip(units, expected, strict=True)) if a != b}
    extra = []
    for n in sorted(odd):
        s = sample_at(n)
        defaults = {
            "device": device,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": ts if ts_list is None else ts_list[n],
            "unit": entries[positions[n]][2],
        }
        x = extra_of(s, defaults)
        if n in moved:
            x["value"] = s["value"]
        if x:
            extra.append({"n": n, **x})
    body: dict[str, Any] = {
        **head,
        "epoch": epoch,
        "device": device,
        "meta": mapping.id,
    }
    body.update(stamps)
    body.update(seqs)
    start = positions[0]
    if positions != list(range(start, start + len(positions))):
        body["i"] = positions
    elif start:
        body["i"] = start
    body["v"] = values
    return finish(body, extra, historical=historical, gaps=gaps, epoch=epoch)
