"""Request planning for an XGT device: which reads one poll of a group makes.

Made once when the driver starts (pure: no network). Two kinds of request exist:

- a **continuous read** (data type 0x14) of up to 1,400 bytes of one area from a byte
  variable (`%MB200`): tags of one area are sorted by byte and merged while the unused
  bytes between them are at most `max_gap_bytes` and the block stays within
  `max_bytes_per_request`. Bits of the word memory (`%MX1601`) are read inside these
  blocks: bit n is bit n % 8 of byte n // 8 (XGT memory is little-endian);
- an **individual read** of up to 16 variables of one data type, from any areas. Timer and
  counter contacts (`%TX`, `%CX`) can only be read this way (their bytes are the current
  values). Blocks left holding a single word (`%DW100` alone) or a single bit, when two
  or more of the same kind exist (contacts included), are packed into individual reads
  (W or X): 16 scattered words cost one request instead of 16.

A value is never split across requests; a value larger than the block cap is a config
error (ValueError naming the tag). Groups are planned separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from drivers.xgt.codec import DATA_TYPE, DT_CONTINUOUS, MAX_BLOCK_BYTES, BlockDecoder, ValueSpec
from drivers.xgt.config import CONTACT_AREAS, XgtDevice, XgtTag

__all__ = [
    "DevicePlan",
    "GroupPlan",
    "Request",
    "TagSlot",
    "clusters",
    "format_plan",
    "plan_device",
    "plan_requests",
    "sub_request",
]

Kind = Literal["continuous", "individual"]


@dataclass(frozen=True, slots=True)
class TagSlot:
    """One tag inside a request: `index` is its position in the group (config order).
    Continuous: `offset` is its first byte relative to the block; individual: `variable`
    is the index of its variable (the data of variable i starts at byte i x unit)."""

    index: int
    tag: str
    area: str
    byte: int  # first byte of the value in its area (absolute)
    offset: int
    spec: ValueSpec
    variable: str = ""  # individual reads: the variable name sent


@dataclass(frozen=True, slots=True)
class Request:
    """One read: a continuous block of `count` bytes of `area` from byte `start`, or an
    individual read of `variables` of size letter `size` (W or X)."""

    kind: Kind
    area: str
    start: int
    count: int
    size: str
    variables: tuple[str, ...]
    slots: tuple[TagSlot, ...]
    decoder: BlockDecoder

    @property
    def data_type(self) -> int:
        """The data type code sent (0x14 continuous, 0x00 bit, 0x02 word...)."""
        return DT_CONTINUOUS if self.kind == "continuous" else DATA_TYPE[self.size]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Data bytes the answer must hold per block."""
        if self.kind == "continuous":
            return (self.count,)
        unit = 1 if self.size == "X" else 2
        return (unit,) * len(self.variables)

    @property
    def start_variable(self) -> str:
        """The byte variable a continuous read starts at (`%MB200`)."""
        return f"%{self.area}B{self.start}"

    def describe(self) -> str:
        """`continuous %MB200 x 64 bytes (12 tags)` or `individual W x 5 (%DW10 ... %MW7)`."""
        tags = len(self.slots)
        plural = "" if tags == 1 else "s"
        if self.kind == "continuous":
            return (
                f"continuous {self.start_variable} x {self.count} byte"
                f"{'' if self.count == 1 else 's'} ({tags} tag{plural})"
            )
        shown = " ".join(self.variables[:4]) + (" ..." if len(self.variables) > 4 else "")
        return f"individual {self.size} x {len(self.variables)} ({shown}; {tags} tag{plural})"


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """The requests of one poll of one group; `tags` are the group's tags in config order."""

    group: str
    interval_s: float
    tags: tuple[str, ...]
    requests: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """Every poll group of one device, keyed by group name."""

    device: str
    groups: dict[str, GroupPlan]


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    tag: XgtTag
    area: str
    byte: int
    count: int
    spec: ValueSpec  # bit relative to `byte`


def _entry(index: int, tag: XgtTag) -> _Entry:
    addr = tag.parsed()
    kind = tag.resolved_type()
    if kind == "bool":
        bit = addr.offset % 8
    elif kind == "bit":
        bit = tag.bit or 0
    else:
        bit = 0
    spec = ValueSpec(kind, bit=bit, length=tag.length or 0)
    return _Entry(index, tag, addr.area, addr.byte_offset, tag.byte_count(), spec)


def _continuous(area: str, entries: Sequence[_Entry]) -> Request:
    start = min(e.byte for e in entries)
    end = max(e.byte + e.count for e in entries)
    slots = tuple(
        TagSlot(e.index, e.tag.name, area, e.byte, e.byte - start, e.spec)
        for e in sorted(entries, key=lambda e: (e.byte, -e.count, e.index))
    )
    decoder = BlockDecoder([(s.offset, s.spec) for s in slots])
    return Request("continuous", area, start, end - start, "B", (), slots, decoder)


def _variable(entry: _Entry) -> tuple[str, str]:
    """(size letter, variable name) of an entry read individually."""
    addr = entry.tag.parsed()
    if entry.spec.data_type == "bool":
        return "X", addr.text
    return "W", f"%{entry.area}W{entry.byte // 2}"


def _individual(size: str, entries: Sequence[_Entry]) -> Request:
    unit = 1 if size == "X" else 2
    slots = []
    names = []
    for number, e in enumerate(entries):
        _, name = _variable(e)
        spec = ValueSpec("bool", bit=0) if size == "X" else e.spec
        slots.append(
            TagSlot(e.index, e.tag.name, e.area, e.byte, number * unit, spec, variable=name)
        )
        names.append(name)
    decoder = BlockDecoder([(s.offset, s.spec) for s in slots])
    return Request("individual", "", 0, 0, size, tuple(names), tuple(slots), decoder)


def _single_kind(request_entries: Sequence[_Entry]) -> str | None:
    """W or X when a block holds one value that an individual read can fetch."""
    if len(request_entries) != 1:
        return None
    (e,) = request_entries
    if e.spec.data_type == "bool":
        return "X"
    if e.count == 2 and e.byte % 2 == 0 and e.spec.data_type != "string":
        return "W"
    return None


def plan_requests(
    tags: Sequence[XgtTag],
    *,
    max_bytes: int = MAX_BLOCK_BYTES,
    max_gap: int = 0,
    max_variables: int = 16,
) -> list[Request]:
    """Plan the reads of `tags` (one group, in config order): continuous blocks by area
    and byte, then individual reads. Raises ValueError when one value is larger than
    `max_bytes`."""
    cap = min(MAX_BLOCK_BYTES, max_bytes)
    by_area: dict[str, list[_Entry]] = {}
    contacts: list[_Entry] = []
    for index, tag in enumerate(tags):
        entry = _entry(index, tag)
        if entry.count > cap:
            raise ValueError(
                f"tag {tag.name!r}: a value of {entry.count} bytes is larger than the "
                f"{cap} bytes this device allows per request"
            )
        if entry.area in CONTACT_AREAS and entry.spec.data_type == "bool":
            contacts.append(entry)
        else:
            by_area.setdefault(entry.area, []).append(entry)

    blocks: list[tuple[str, list[_Entry]]] = []
    for area in sorted(by_area):
        entries = sorted(by_area[area], key=lambda e: (e.byte, -e.count, e.index))
        current: list[_Entry] = []
        start = end = 0
        for e in entries:
            e_end = e.byte + e.count
            if current and e.byte - end <= max_gap and max(end, e_end) - start <= cap:
                current.append(e)
                end = max(end, e_end)
                continue
            if current:
                blocks.append((area, current))
            current, start, end = [e], e.byte, e_end
        if current:
            blocks.append((area, current))

    singles: dict[str, list[int]] = {"W": [], "X": []}
    for number, (_, entries) in enumerate(blocks):
        kind = _single_kind(entries)
        if kind is not None:
            singles[kind].append(number)
    packed: set[int] = set()
    individual: dict[str, list[_Entry]] = {"X": list(contacts), "W": []}
    for kind, found in singles.items():
        # Worth it when the singles share a request (with each other or with contacts).
        if len(found) + len(individual[kind]) >= 2:
            packed.update(found)
            for number in found:
                individual[kind].extend(blocks[number][1])

    requests = [
        _continuous(area, entries)
        for number, (area, entries) in enumerate(blocks)
        if number not in packed
    ]
    for kind in ("W", "X"):
        chosen = sorted(individual[kind], key=lambda e: e.index)
        for i in range(0, len(chosen), max_variables):
            requests.append(_individual(kind, chosen[i : i + max_variables]))
    return requests


def clusters(request: Request) -> list[tuple[TagSlot, ...]]:
    """The smallest pieces `request` can be split into: one variable of an individual
    read, or the tags of a block whose bytes overlap (several bits of one byte, a value
    read twice)."""
    if request.kind == "individual":
        return [(s,) for s in request.slots]
    ordered = sorted(request.slots, key=lambda s: (s.offset, -s.spec.byte_count, s.index))
    out: list[list[TagSlot]] = []
    end = -1
    for slot in ordered:
        slot_end = slot.offset + slot.spec.byte_count
        if out and slot.offset < end:
            out[-1].append(slot)
            end = max(end, slot_end)
        else:
            out.append([slot])
            end = slot_end
    return [tuple(c) for c in out]


def sub_request(request: Request, slots: Sequence[TagSlot]) -> Request:
    """A request of the same kind reading only `slots` (a subset of `request.slots`)."""
    if not slots:
        raise ValueError("a sub-request needs at least one slot")
    if request.kind == "individual":
        unit = 1 if request.size == "X" else 2
        ordered = sorted(slots, key=lambda s: s.offset)
        moved = tuple(
            TagSlot(s.index, s.tag, s.area, s.byte, n * unit, s.spec, s.variable)
            for n, s in enumerate(ordered)
        )
        decoder = BlockDecoder([(s.offset, s.spec) for s in moved])
        names = tuple(s.variable for s in moved)
        return Request("individual", "", 0, 0, request.size, names, moved, decoder)
    first = min(s.byte for s in slots)
    last = max(s.byte + s.spec.byte_count for s in slots)
    ordered = sorted(slots, key=lambda s: (s.byte, -s.spec.byte_count, s.index))
    moved = tuple(TagSlot(s.index, s.tag, s.area, s.byte, s.byte - first, s.spec) for s in ordered)
    decoder = BlockDecoder([(s.offset, s.spec) for s in moved])
    return Request("continuous", request.area, first, last - first, "B", (), moved, decoder)


def plan_device(device: XgtDevice) -> DevicePlan:
    """The plan of every poll group of `device`. Raises ValueError on a tag whose group
    is not declared or whose value is larger than the per-request cap."""
    intervals = device.group_intervals()
    members: dict[str, list[XgtTag]] = {name: [] for name in intervals}
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
        requests = plan_requests(
            tags,
            max_bytes=device.max_bytes_per_request,
            max_gap=device.max_gap_bytes,
            max_variables=device.max_variables_per_request,
        )
        groups[name] = GroupPlan(
            name, intervals[name], tuple(t.name for t in tags), tuple(requests)
        )
    return DevicePlan(device=device.name, groups=groups)


def format_plan(devices: XgtDevice | Sequence[XgtDevice]) -> str:
    """What `edge-agent plan CONFIG` prints: per device, per group, each request and the
    number of requests per poll. Raises ValueError like plan_device."""
    if isinstance(devices, XgtDevice):
        devices = [devices]
    lines: list[str] = []
    for device in devices:
        plan = plan_device(device)
        lines.append(
            f"device {device.name} (xgt {device.cpu} {device.host}:{device.port}, "
            f"{len(device.tags)} tags)"
        )
        per_second = 0.0
        for group in plan.groups.values():
            n, tags = len(group.requests), len(group.tags)
            per_second += n / group.interval_s
            lines.append(
                f"  group {group.group} every {group.interval_s:g} s: "
                f"{tags} tag{'' if tags == 1 else 's'}, {n} request{'' if n == 1 else 's'} per poll"
            )
            lines.extend(f"    {request.describe()}" for request in group.requests)
        lines.append(f"  total: {per_second:.3g} requests/s")
    return "\n".join(lines)
