"""Request planning for an S7 device: which multi-variable reads one poll of a group makes.

Made once when the driver starts (pure: no network), for a PDU size (the configured
one; the driver plans again if the PLC grants less). Rules, per poll group:

- every tag is a byte range (a bool reads the byte holding its bit); ranges of the same
  area and DB merge into one *variable* while the unused bytes between them are at most
  `max_gap` and the variable's data fits one answer (PDU size - 18 bytes);
- a value is never split across two variables; a single value larger than one answer
  can carry is a config error (ValueError naming the tag);
- variables are packed into requests (first fit, largest first) while the request
  (12 bytes per variable) and its answer (4 bytes per variable + data + fill bytes)
  fit the PDU, and at most `max_items_per_request` variables go in one request;
- groups are planned separately, so each group's poll reads only its own tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drivers.s7.codec import (
    ACK_HEADER,
    ITEM_HEADER,
    ITEM_SPEC,
    JOB_HEADER,
    READ_PARAMS,
    ReadItem,
    ValueSpec,
    read_response_size,
)
from drivers.s7.config import AREA_CODE, Area, S7Device, S7Tag

__all__ = [
    "DevicePlan",
    "GroupPlan",
    "Request",
    "TagSlot",
    "Variable",
    "clusters",
    "format_plan",
    "max_items",
    "max_variable_bytes",
    "pack",
    "plan_device",
    "plan_variables",
    "sub_variable",
]

_AREA_ORDER: dict[str, int] = {"DB": 0, "M": 1, "I": 2, "Q": 3}


@dataclass(frozen=True, slots=True)
class TagSlot:
    """One tag inside a variable: `index` is its position in the group (config order),
    `offset` its first byte relative to the variable's start."""

    index: int
    tag: str
    offset: int
    spec: ValueSpec


@dataclass(frozen=True, slots=True)
class Variable:
    """One item of a multi-variable read: `count` bytes of `area` (DB `db`) from `start`."""

    area: Area
    db: int
    start: int
    count: int
    slots: tuple[TagSlot, ...]

    @property
    def item(self) -> ReadItem:
        return ReadItem(AREA_CODE[self.area], self.db, self.start, self.count)

    def where(self, first: int = 0, last: int | None = None) -> str:
        """`DB1.DBB0..99`, `MB10`, for logs and reasons."""
        lo = self.start + first
        hi = self.start + (self.count - 1 if last is None else last)
        prefix = f"DB{self.db}.DBB" if self.area == "DB" else f"{self.area}B"
        return f"{prefix}{lo}" if lo == hi else f"{prefix}{lo}..{hi}"

    def describe(self) -> str:
        """e.g. `DB1.DBB0..99 (100 bytes, 40 tags)`."""
        tags = len(self.slots)
        unit = "byte" if self.count == 1 else "bytes"
        return f"{self.where()} ({self.count} {unit}, {tags} tag{'' if tags == 1 else 's'})"


@dataclass(frozen=True, slots=True)
class Request:
    """One read-variable job."""

    variables: tuple[Variable, ...]

    @property
    def items(self) -> tuple[ReadItem, ...]:
        return tuple(v.item for v in self.variables)

    def answer_size(self) -> int:
        return read_response_size([v.count for v in self.variables])

    def request_size(self) -> int:
        return JOB_HEADER + READ_PARAMS + ITEM_SPEC * len(self.variables)

    def describe(self) -> str:
        n = len(self.variables)
        return (
            f"read {n} variable{'' if n == 1 else 's'}, answer {self.answer_size()} bytes: "
            + ", ".join(v.where() for v in self.variables)
        )


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """The requests of one poll of one group; `tags` are the group's tags in config order."""

    group: str
    interval_s: float
    tags: tuple[str, ...]
    requests: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """Every poll group of one device, for one PDU size."""

    device: str
    pdu_size: int
    groups: dict[str, GroupPlan]


def max_variable_bytes(pdu_size: int) -> int:
    """The most data one variable can carry: the answer holds its header and one item."""
    return pdu_size - ACK_HEADER - READ_PARAMS - ITEM_HEADER


def max_items(pdu_size: int, cap: int) -> int:
    """Variables per request: what the request PDU holds, at most `cap`."""
    return max(1, min(cap, (pdu_size - JOB_HEADER - READ_PARAMS) // ITEM_SPEC))


def spec_of(tag: S7Tag) -> ValueSpec:
    addr = tag.resolved_address()
    t = tag.resolved_type()
    return ValueSpec(t, addr.bit or 0, (tag.length or 254) if t == "string" else 0)


def plan_variables(tags: Sequence[S7Tag], *, pdu_size: int, max_gap: int = 0) -> list[Variable]:
    """Merge `tags` (one group, in config order) into variables, in address order.
    Slot indexes refer to positions in `tags`."""
    cap = max_variable_bytes(pdu_size)
    by_area: dict[tuple[str, int], list[tuple[int, int, int, S7Tag]]] = {}
    for index, tag in enumerate(tags):
        addr = tag.resolved_address()
        size = tag.size()
        if size > cap:
            raise ValueError(
                f"tag {tag.name!r}: a {tag.resolved_type()} of {size} bytes is larger than "
                f"the {cap} bytes one answer carries at PDU size {pdu_size}"
                + (" (declare a shorter length)" if tag.resolved_type() == "string" else "")
            )
        by_area.setdefault((addr.area, addr.db), []).append((addr.byte, size, index, tag))
    out: list[Variable] = []
    for area, db in sorted(by_area, key=lambda k: (_AREA_ORDER[k[0]], k[1])):
        entries = sorted(by_area[(area, db)], key=lambda e: (e[0], -e[1], e[2]))
        current: list[tuple[int, int, int, S7Tag]] = []
        lo = hi = 0  # hi exclusive
        for entry in entries:
            start, size = entry[0], entry[1]
            end = start + size
            if current and start - hi <= max_gap and max(hi, end) - lo <= cap:
                current.append(entry)
                hi = max(hi, end)
                continue
            if current:
                out.append(_variable(area, db, lo, hi, current))  # type: ignore[arg-type]
            current, lo, hi = [entry], start, end
        if current:
            out.append(_variable(area, db, lo, hi, current))  # type: ignore[arg-type]
    return out


def _variable(
    area: Area, db: int, lo: int, hi: int, entries: list[tuple[int, int, int, S7Tag]]
) -> Variable:
    slots = tuple(
        TagSlot(index=i, tag=t.name, offset=start - lo, spec=spec_of(t))
        for start, _, i, t in entries
    )
    return Variable(area=area, db=db, start=lo, count=hi - lo, slots=slots)


def pack(
    variables: Sequence[Variable], *, pdu_size: int, max_items_per_request: int
) -> list[Request]:
    """Pack variables into as few requests as the PDU allows (first fit decreasing)."""
    cap_items = max_items(pdu_size, max_items_per_request)
    order = sorted(range(len(variables)), key=lambda i: (-variables[i].count, i))
    bins: list[list[int]] = []
    loads: list[int] = []  # answer bytes, counting a fill byte after every odd item
    budget = pdu_size - ACK_HEADER - READ_PARAMS
    for i in order:
        need = ITEM_HEADER + variables[i].count
        for b, members in enumerate(bins):
            # Counting every item's fill byte is exact up to one byte (the last item of
            # an answer has none) and never too small, whatever order the items go in.
            if len(members) < cap_items and loads[b] + need + (variables[i].count & 1) <= budget:
                members.append(i)
                loads[b] += need + (variables[i].count & 1)
                break
        else:
            bins.append([i])
            loads.append(need + (variables[i].count & 1))
    bins.sort(key=min)
    return [Request(tuple(variables[i] for i in sorted(members))) for members in bins]


def clusters(variable: Variable) -> list[tuple[TagSlot, ...]]:
    """The smallest pieces `variable` can be split into, in address order: slots whose
    bytes overlap (bits of one byte, a value read twice) stay together."""
    ordered = sorted(variable.slots, key=lambda s: (s.offset, -s.spec.size, s.index))
    out: list[list[TagSlot]] = []
    end = -1
    for slot in ordered:
        slot_end = slot.offset + slot.spec.size
        if out and slot.offset < end:
            out[-1].append(slot)
            end = max(end, slot_end)
        else:
            out.append([slot])
            end = slot_end
    return [tuple(c) for c in out]


def sub_variable(variable: Variable, slots: Sequence[TagSlot]) -> Variable:
    """A variable reading only `slots` (a subset of `variable.slots`)."""
    if not slots:
        raise ValueError("a sub-variable needs at least one slot")
    first = min(s.offset for s in slots)
    last = max(s.offset + s.spec.size for s in slots)
    moved = tuple(
        TagSlot(index=s.index, tag=s.tag, offset=s.offset - first, spec=s.spec)
        for s in sorted(slots, key=lambda s: (s.offset, s.index))
    )
    return Variable(
        area=variable.area,
        db=variable.db,
        start=variable.start + first,
        count=last - first,
        slots=moved,
    )


def plan_device(device: S7Device, pdu_size: int | None = None) -> DevicePlan:
    """The plan of every poll group of `device` for `pdu_size` (default: the configured
    one). Raises ValueError on a tag whose group is not declared or whose value is larger
    than one answer."""
    pdu = device.pdu_size if pdu_size is None else pdu_size
    intervals = device.group_intervals()
    members: dict[str, list[S7Tag]] = {name: [] for name in intervals}
    for tag in device.tags:
        if tag.group not in members:
            known = ", ".join(sorted(intervals))
            raise ValueError(
                f"device {device.name!r} tag {tag.name!r}: poll group {tag.group!r} is not "
                f"declared (known: {known})"
            )
        members[tag.group].append(tag)
    groups: dict[str, GroupPlan] = {}
    for name, tags in members.items():
        if not tags:
            continue
        variables = plan_variables(tags, pdu_size=pdu, max_gap=device.max_gap)
        requests = pack(variables, pdu_size=pdu, max_items_per_request=device.max_items_per_request)
        groups[name] = GroupPlan(
            name, intervals[name], tuple(t.name for t in tags), tuple(requests)
        )
    return DevicePlan(device=device.name, pdu_size=pdu, groups=groups)


def format_plan(devices: S7Device | Sequence[S7Device]) -> str:
    """Human-readable plan for `edge-agent plan CONFIG`: per device, per group, each
    request and the number of requests per poll. Raises ValueError like plan_device."""
    if isinstance(devices, S7Device):
        devices = [devices]
    lines: list[str] = []
    for device in devices:
        plan = plan_device(device)
        local, remote = device.tsaps()
        lines.append(
            f"device {device.name} (s7 {device.host}:{device.port} TSAP "
            f"{local >> 8:02X}.{local & 0xFF:02X}/{remote >> 8:02X}.{remote & 0xFF:02X}, "
            f"PDU {plan.pdu_size}, {len(device.tags)} tags)"
        )
        per_second = 0.0
        for group in plan.groups.values():
            n, tags = len(group.requests), len(group.tags)
            nvars = sum(len(r.variables) for r in group.requests)
            per_second += n / group.interval_s
            lines.append(
                f"  group {group.group} every {group.interval_s:g} s: "
                f"{tags} tag{'' if tags == 1 else 's'}, "
                f"{nvars} variable{'' if nvars == 1 else 's'}, "
                f"{n} request{'' if n == 1 else 's'} per poll"
            )
            lines.extend(f"    {request.describe()}" for request in group.requests)
        lines.append(f"  total: {per_second:.3g} requests/s")
    return "\n".join(lines)
