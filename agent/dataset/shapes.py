"""Samples → the rows of a dataset, in the platform's shapes. Pure code.

- `time`: one row per device and poll (`ts_agent`): ``ts, device`` then, per tag, a
  value column ``TAG`` and a quality column ``TAG__quality``.
- `cycle`: one row per machine cycle (one shot of a moulding machine): ``cycle, ts,
  device, gap_before`` then the cycle's parameters (value and quality columns). Made from
  the agent's cycle snapshots (`cycle=NAME`: the derived tags ``NAME`` — the cycle id —
  and ``NAME.TAG``, grouped by their ``cycle`` member; docs/derive.md), or from raw
  polls (`counter=TAG`: the first poll that shows each new value of a counter such as
  the shot number). ``gap_before`` counts
  the cycle ids missing right before the row (an outage); the row of a counter that went
  back (a reset) has 0 and is listed in the gaps as a reset.
- `window`: one row per device and window: ``ts`` (the window's end), ``window_start``,
  ``device``, then the window features ``TAG.FEATURE`` (``TAG.good_share`` included),
  with their quality columns.

Every shape is ordered by device, then time (cycle: cycle id), and deduplicated by
(agent, epoch, seq) before it is shaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.dataset.store import SeenSeqs
from agent.derive.config import FEATURES, GOOD_SHARE

Shape = Literal["time", "cycle", "window"]
SHAPES: tuple[Shape, ...] = ("time", "cycle", "window")

QUALITY_SUFFIX = "__quality"

#: Suffixes of window-feature tags (agent.derive's features and the good share).
WINDOW_FEATURES = frozenset(FEATURES) | {GOOD_SHARE}


class ShapeError(ValueError):
    """The samples cannot be put in the asked shape (no cycle tag found, say)."""


@dataclass
class Table:
    """A dataset: `columns` in order, one dict per row (a missing key is an empty cell),
    the unit of each value column that has one, and what the sidecar reports."""

    shape: Shape
    columns: list[str]
    rows: list[dict[str, Any]]
    units: dict[str, str] = field(default_factory=dict)
    seq_gaps: list[dict[str, Any]] = field(default_factory=list)
    cycle_gaps: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    duplicates: int = 0
    duplicate_cycles: int = 0


def build(
    samples: Iterable[dict[str, Any]],
    shape: Shape,
    *,
    devices: Sequence[str] = (),
    tags: Sequence[str] = (),
    cycle: str | None = None,
    counter: str | None = None,
) -> Table:
    """The table of `samples` in `shape`. `devices` / `tags` keep only those (tags by
    column name: for `cycle` without the ``NAME.`` prefix). Seq gaps are computed over
    all samples given, before the device filter: give the collector's whole stream.
    The samples are read once, as a stream: only the rows are held in memory."""
    seen = SeenSeqs()
    counts = {"unique": 0, "dropped": 0}
    wanted = set(devices)

    def unique() -> Iterator[dict[str, Any]]:
        for s in samples:
            if not seen.add(s["agent"], s["epoch"], s["seq"]):
                counts["dropped"] += 1
                continue
            counts["unique"] += 1
            if not wanted or s["device"] in wanted:
                yield s

    if shape == "time":
        table = _time(unique(), tags)
    elif shape == "window":
        table = _time((s for s in unique() if _feature_tag(s["tag"])), tags, shape="window")
    else:
        table = _cycles(unique(), tags, cycle, counter)
    table.samples = counts["unique"]
    table.duplicates = counts["dropped"]
    table.seq_gaps = seen.gaps()
    return table


def _feature_tag(tag: str) -> bool:
    base, dot, feature = tag.rpartition(".")
    return bool(dot and base and feature in WINDOW_FEATURES)


def _time(picked: Iterable[dict[str, Any]], tags: Sequence[str], shape: Shape = "time") -> Table:
    keep = set(tags)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    names: dict[str, None] = {}
    units: dict[str, str] = {}
    for s in picked:
        tag = s["tag"]
        if keep and tag not in keep:
            continue
        row = rows.setdefault(
            (s["device"], s["ts_agent"]), {"ts": s["ts_agent"], "device": s["device"]}
        )
        if shape == "window" and isinstance(s.get("window_start"), str):
            row.setdefault("window_start", s["window_start"])
        _put(row, tag, s, names, units)
    ordered = sorted(rows.values(), key=lambda r: (r["device"], r["ts"]))
    head = ["ts", "window_start", "device"] if shape == "window" else ["ts", "device"]
    return Table(shape, [*head, *_value_columns(names)], ordered, units)


def _put(
    row: dict[str, Any],
    column: str,
    s: dict[str, Any],
    names: dict[str, None],
    units: dict[str, str],
) -> None:
    # Two samples of one tag in one poll (not made by the agent): the later one wins.
    row[column] = s.get("value")
    row[column + QUALITY_SUFFIX] = s["quality"]
    names.setdefault(column, None)
    unit = s.get("unit")
    if isinstance(unit, str) and unit:
        units.setdefault(column, unit)


def _value_columns(names: dict[str, None]) -> list[str]:
    out = []
    for name in names:
        out += [name, name + QUALITY_SUFFIX]
    return out


def _cycles(
    picked: Iterable[dict[str, Any]], tags: Sequence[str], cycle: str | None, counter: str | None
) -> Table:
    if cycle is not None and counter is not None:
        raise ShapeError("give either a cycle name or a counter tag, not both")
    if counter is not None:
        return _counter_cycles(picked, tags, counter)
    return _snapshot_cycles(picked, tags, cycle)


def _counter_cycles(picked: Iterable[dict[str, Any]], tags: Sequence[str], counter: str) -> Table:
    """One row per new good value of a counter, from the first poll that shows it."""
    table = _time(picked, ())
    raw = [r for r in table.rows if counter in r]
    keep = set(tags)
    names: dict[str, None] = {}
    for c in table.columns[2:]:
        if not c.endswith(QUALITY_SUFFIX) and c != counter and (not keep or c in keep):
            names[c] = None
    cycles: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for r in sorted(raw, key=lambda r: (r["device"], r["ts"])):
        value = r[counter]
        if r.get(counter + QUALITY_SUFFIX) != "good" or not _is_int(value):
            continue
        if last.get(r["device"]) == value:
            continue
        last[r["device"]] = value
        row = {"cycle": value, "ts": r["ts"], "device": r["device"]}
        for c in names:
            if c in r:
                row[c] = r[c]
                row[c + QUALITY_SUFFIX] = r[c + QUALITY_SUFFIX]
        cycles.append(row)
    return _number(cycles, list(names), {k: v for k, v in table.units.items() if k in names})


def _snapshot_cycles(
    picked: Iterable[dict[str, Any]], tags: Sequence[str], cycle: str | None
) -> Table:
    """One row per cycle snapshot of agent.derive (docs/derive.md)."""
    keep = set(tags)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    names: dict[str, dict[str, None]] = {}
    units: dict[str, dict[str, str]] = {}
    for s in picked:
        tag = s["tag"]
        if cycle is not None:
            if tag != cycle and not tag.startswith(cycle + "."):
                continue
            name = cycle
        elif "cycle" in s:  # agent.derive marks every sample of a snapshot
            name = tag.split(".", 1)[0]
        else:
            continue
        # The cycle id is on every sample of a snapshot (`cycle`); a record without it
        # is grouped by its trigger time.
        cid = s.get("cycle")
        key = (name, s["agent"], s["epoch"], s["device"], cid if _is_int(cid) else s["ts_agent"])
        row = groups.setdefault(key, {"device": s["device"]})
        if tag == name:
            row["cycle"] = s.get("value") if not _is_int(cid) else cid
            row["ts"] = s["ts_agent"]
            names.setdefault(name, {})
            continue
        column = tag[len(name) + 1 :]
        if keep and column not in keep:
            continue
        _put(row, column, s, names.setdefault(name, {}), units.setdefault(name, {}))
    found = sorted(names)
    if cycle is None and len(found) != 1:
        raise ShapeError(
            "cannot tell the cycle records apart: "
            + (f"several cycles {', '.join(found)}" if found else "no cycle records")
            + "; name the cycle (--cycle NAME) or a counter tag (--counter TAG)"
        )
    name = cycle if cycle is not None else found[0]
    rows = [
        r for key, r in groups.items() if key[0] == name and _is_int(r.get("cycle")) and "ts" in r
    ]
    if not rows:
        raise ShapeError(f"no cycle records named {name!r} with an integer cycle id in the input")
    return _number(rows, list(names.get(name, {})), units.get(name, {}))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(rows: list[dict[str, Any]], names: list[str], units: dict[str, str]) -> Table:
    """Order the cycle rows, drop repeated cycle ids, mark the gaps between ids."""
    rows.sort(key=lambda r: (r["device"], r["cycle"], r["ts"]))
    out: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    duplicates = 0
    previous: dict[str, int] = {}
    for r in rows:
        device, cid = r["device"], r["cycle"]
        before = previous.get(device)
        if before == cid:
            duplicates += 1
            continue
        gap = 0
        if before is not None and cid > before + 1:
            gap = cid - before - 1
            gaps.append(
                {"device": device, "after_cycle": before, "before_cycle": cid, "missing": gap}
            )
        r["gap_before"] = gap
        previous[device] = cid
        out.append(r)
    # A counter that went back (reset, wrap) sorts before the older ids: said per device.
    out.sort(key=lambda r: (r["device"], r["ts"]))
    last_seen: dict[str, int] = {}
    for r in out:
        prev = last_seen.get(r["device"])
        if prev is not None and r["cycle"] < prev:
            gaps.append(
                {"device": r["device"], "reset_from": prev, "reset_to": r["cycle"], "ts": r["ts"]}
            )
        last_seen[r["device"]] = r["cycle"]
    columns = ["cycle", "ts", "device", "gap_before", *_value_columns(dict.fromkeys(names))]
    table = Table("cycle", columns, out, units)
    table.cycle_gaps = gaps
    table.duplicate_cycles = duplicates
    return table
