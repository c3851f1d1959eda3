"""Request planning for a MELSEC device: which SLMP reads one poll of a group makes.

Made once when the driver starts (pure: no network). Rules, per poll group:

1. Per device family (D, M, X…), tags are sorted by number and merged into one batch
   read (0401) while the unused words (bits) between them are at most `max_gap` and the
   read stays within the cap: 960 words, or 7,168 bits (3,584 on iQ-F) in bit units.
   A value is never split across two reads; one larger than the cap is a config error.
2. With `random_read` on, the small batch reads left over are pooled into random reads
   (0403, at most 192 word + double-word points each) when that saves requests: a batch
   read costs one point per 16-bit value, one per 32-bit value, one per 16 bits of a bit
   device (from a multiple of 16); reads holding 64-bit values or strings stay batch
   reads. Pooling is greedy, smallest reads first, and a random read replaces only two or
   more batch reads.
3. Groups are planned separately, so each group's poll reads only its own tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.melsec.codec import (
    CMD_BATCH_READ,
    CMD_RANDOM_READ,
    SUB_BIT,
    SUB_WORD,
    SlotCodec,
    batch_read_body,
    random_read_body,
)
from drivers.melsec.config import (
    MAX_RANDOM_POINTS,
    MAX_WORDS,
    Address,
    DeviceKind,
    MelsecDevice,
    MelsecTag,
    Series,
    parse_address,
)

__all__ = [
    "DevicePlan",
    "GroupPlan",
    "Request",
    "TagSlot",
    "format_plan",
    "plan_device",
    "plan_requests",
    "sub_batch",
]


@dataclass(frozen=True, slots=True)
class TagSlot:
    """One tag inside a request: `index` is its position in the group (config order)."""

    index: int
    tag: str
    address: Address
    data_type: str
    words: int  # words the value occupies (1 point for a bit device)
    codec: SlotCodec


@dataclass(frozen=True, slots=True)
class Request:
    """One SLMP read. `mode` is 'words' or 'bits' (batch read of `count` points of `kind`
    from `start`) or 'random' (random read of `word_points` and `dword_points`, standing
    for the batch reads `parts`)."""

    mode: str
    slots: tuple[TagSlot, ...]
    series: Series
    kind: DeviceKind | None = None
    start: int = 0
    count: int = 0
    word_points: tuple[tuple[int, DeviceKind], ...] = ()
    dword_points: tuple[tuple[int, DeviceKind], ...] = ()
    parts: tuple[Request, ...] = ()
    command: int = field(init=False)
    subcommand: int = field(init=False)
    body: bytes = field(init=False)
    data_length: int = field(init=False)

    def __post_init__(self) -> None:
        if self.mode == "random":
            words = [(n, k.code) for n, k in self.word_points]
            dwords = [(n, k.code) for n, k in self.dword_points]
            body = random_read_body(words, dwords)
            command, sub = CMD_RANDOM_READ, SUB_WORD
            length = 2 * len(words) + 4 * len(dwords)
        else:
            assert self.kind is not None
            bits = self.mode == "bits"
            body = batch_read_body(self.start, self.kind.code, self.count)
            command, sub = CMD_BATCH_READ, SUB_BIT if bits else SUB_WORD
            length = (self.count + 1) // 2 if bits else 2 * self.count
        object.__setattr__(self, "command", command)
        object.__setattr__(self, "subcommand", sub)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "data_length", length)

    @property
    def points(self) -> int:
        """Points the request reads (words, bits, or random word + dword points)."""
        if self.mode == "random":
            return len(self.word_points) + len(self.dword_points)
        return self.count

    def describe(self) -> str:
        """e.g. `D100..D219 (120 words, 60 tags)` or `random 14 words + 3 dwords (17 tags)`."""
        tags = len(self.slots)
        tag_text = f"{tags} tag{'' if tags == 1 else 's'}"
        if self.mode == "random":
            return (
                f"random {len(self.word_points)} words + {len(self.dword_points)} dwords "
                f"({tag_text})"
            )
        assert self.kind is not None
        first = Address(self.kind, self.start).text(self.series)
        last = Address(self.kind, self.start + self.count - 1).text(self.series)
        unit = "bits" if self.mode == "bits" else "words"
        if self.count == 1:
            unit = unit[:-1]
        return f"{first}..{last} ({self.count} {unit}, {tag_text})"


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """The requests of one poll of one group; `tags` are the group's tags in config order."""

    group: str
    interval_s: float
    tags: tuple[str, ...]
    requests: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class DevicePlan:
    device: str
    groups: dict[str, GroupPlan]


_Entry = tuple[int, int, int, MelsecTag, Address]  # number, points, index, tag, address


def _slot(entry: _Entry, start: int, bits: bool) -> TagSlot:
    number, points, index, tag, addr = entry
    t = tag.resolved_type()
    if bits:
        codec = SlotCodec("point", t, number - start)
    elif addr.bit is not None:
        codec = SlotCodec("wordbit", t, 2 * (number - start), bit=addr.bit)
    else:
        codec = SlotCodec("word", t, 2 * (number - start), size=2 * points)
    return TagSlot(index, tag.name, addr, t, points, codec)


def _batch(
    kind: DeviceKind, series: Series, start: int, end: int, entries: list[_Entry]
) -> Request:
    bits = kind.is_bit
    slots = tuple(_slot(e, start, bits) for e in entries)
    return Request(
        mode="bits" if bits else "words",
        slots=slots,
        series=series,
        kind=kind,
        start=start,
        count=end - start,
    )


def sub_batch(request: Request, slots: Sequence[TagSlot]) -> Request:
    """A batch read of only `slots` (a subset of the batch `request`'s slots), from the
    first word (bit) of the first slot to the last of the last one."""
    if not slots or request.kind is None:
        raise ValueError("a sub-request needs a batch request and at least one slot")
    bits = request.mode == "bits"
    start = min(s.address.number for s in slots)
    end = max(s.address.number + s.words for s in slots)
    ordered = sorted(slots, key=lambda s: (s.address.number, -s.words, s.index))
    moved = []
    for s in ordered:
        rel = s.address.number - start
        if bits:
            codec = SlotCodec("point", s.data_type, rel)
        elif s.codec.where == "wordbit":
            codec = SlotCodec("wordbit", s.data_type, 2 * rel, bit=s.codec.bit)
        else:
            codec = SlotCodec("word", s.data_type, 2 * rel, size=2 * s.words)
        moved.append(TagSlot(s.index, s.tag, s.address, s.data_type, s.words, codec))
    return Request(
        mode=request.mode,
        slots=tuple(moved),
        series=request.series,
        kind=request.kind,
        start=start,
        count=end - start,
    )


def _random_cost(request: Request) -> int | None:
    """Random-read points that would read `request`'s tags, or None when it cannot."""
    if request.mode == "bits":
        return len({slot.address.number // 16 for slot in request.slots})
    points: set[tuple[int, int]] = set()
    for slot in request.slots:
        if slot.words > 2 or slot.data_type == "string":
            return None
        points.add((slot.address.number, slot.words))
    return len(points)


def _random(requests: Sequence[Request], series: Series) -> Request:
    words: list[tuple[int, DeviceKind]] = []
    dwords: list[tuple[int, DeviceKind]] = []
    word_at: dict[tuple[int, int], int] = {}
    dword_at: dict[tuple[int, int], int] = {}
    placed: list[tuple[TagSlot, str, int, int]] = []  # slot, 'w'/'d', point index, bit
    for request in requests:
        assert request.kind is not None
        kind = request.kind
        for slot in request.slots:
            if request.mode == "bits":
                # 16 points from a multiple of 16: a CPU's bit device ranges are whole
                # multiples of 16 points, so the word never runs past the last point.
                base = slot.address.number - slot.address.number % 16
                key = (kind.code, base)
                if key not in word_at:
                    word_at[key] = len(words)
                    words.append((base, kind))
                placed.append((slot, "w", word_at[key], slot.address.number % 16))
            elif slot.words == 2:
                key = (kind.code, slot.address.number)
                if key not in dword_at:
                    dword_at[key] = len(dwords)
                    dwords.append((slot.address.number, kind))
                placed.append((slot, "d", dword_at[key], 0))
            else:
                key = (kind.code, slot.address.number)
                if key not in word_at:
                    word_at[key] = len(words)
                    words.append((slot.address.number, kind))
                placed.append((slot, "w", word_at[key], slot.address.bit or 0))
    n_words = len(words)
    slots = []
    for slot, which, point, bit in placed:
        offset = 2 * point if which == "w" else 2 * n_words + 4 * point
        if slot.data_type == "bool":
            codec = SlotCodec("wordbit", "bool", offset, bit=bit)
        else:
            codec = SlotCodec("word", slot.data_type, offset, size=2 * slot.words)
        slots.append(TagSlot(slot.index, slot.tag, slot.address, slot.data_type, slot.words, codec))
    return Request(
        mode="random",
        slots=tuple(slots),
        series=series,
        word_points=tuple(words),
        dword_points=tuple(dwords),
        parts=tuple(requests),
    )


def plan_requests(
    tags: Sequence[MelsecTag],
    series: Series,
    *,
    max_words: int = MAX_WORDS,
    max_bits: int = 7168,
    max_gap: int = 0,
    random_read: bool = True,
    max_random_points: int = MAX_RANDOM_POINTS,
) -> list[Request]:
    """Plan `tags` (one group, in config order). Raises ValueError for a value larger
    than the cap."""
    by_kind: dict[str, list[_Entry]] = {}
    kinds: dict[str, DeviceKind] = {}
    for index, tag in enumerate(tags):
        addr = parse_address(tag.address, series)
        points = 1 if addr.kind.is_bit else tag.word_count()
        if not addr.kind.is_bit and points > max_words:
            raise ValueError(
                f"tag {tag.name!r}: a {tag.resolved_type()} of {points} words is larger than "
                f"the {max_words} words this device allows per request"
            )
        by_kind.setdefault(addr.kind.name, []).append((addr.number, points, index, tag, addr))
        kinds[addr.kind.name] = addr.kind

    batches: list[Request] = []
    for name in sorted(by_kind, key=lambda n: (not kinds[n].is_bit, n)):
        kind = kinds[name]
        cap = max_bits if kind.is_bit else max_words
        entries = sorted(by_kind[name], key=lambda e: (e[0], -e[1], e[2]))
        current: list[_Entry] = []
        start = end = 0
        for entry in entries:
            number, points = entry[0], entry[1]
            e_end = number + points
            if current and number - end <= max_gap and max(end, e_end) - start <= cap:
                current.append(entry)
                end = max(end, e_end)
                continue
            if current:
                batches.append(_batch(kind, series, start, end, current))
            current, start, end = [entry], number, e_end
        if current:
            batches.append(_batch(kind, series, start, end, current))

    if not random_read:
        return batches
    costs = [(c, i) for i, r in enumerate(batches) if (c := _random_cost(r)) is not None]
    costs = [(c, i) for c, i in costs if c <= max_random_points]
    costs.sort()
    bins: list[list[int]] = []
    used = 0
    for cost, i in costs:
        if not bins or used + cost > max_random_points:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += cost
    pooled: set[int] = set()
    randoms: list[Request] = []
    for members in bins:
        if len(members) < 2:
            continue
        members.sort()
        pooled.update(members)
        randoms.append(_random([batches[i] for i in members], series))
    return [r for i, r in enumerate(batches) if i not in pooled] + randoms


def plan_device(device: MelsecDevice) -> DevicePlan:
    """The plan of every poll group of `device`. Raises ValueError on a tag whose group
    is not declared or whose value is larger than the per-request cap."""
    intervals = device.group_intervals()
    members: dict[str, list[MelsecTag]] = {name: [] for name in intervals}
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
            device.series,
            max_words=device.max_words_per_request,
            max_bits=device.bit_cap(),
            max_gap=device.max_gap,
            random_read=device.random_read,
            max_random_points=device.max_random_points,
        )
        groups[name] = GroupPlan(
            name, intervals[name], tuple(t.name for t in tags), tuple(requests)
        )
    return DevicePlan(device.name, groups)


def format_plan(devices: MelsecDevice | Sequence[MelsecDevice]) -> str:
    """Human-readable plan for `edge-agent plan CONFIG`: per device, per group, each
    request and the number of requests per poll."""
    if isinstance(devices, MelsecDevice):
        devices = [devices]
    lines: list[str] = []
    for device in devices:
        plan = plan_device(device)
        lines.append(
            f"device {device.name} (melsec {device.series} {device.frame.upper()} "
            f"{device.host}:{device.port} network {device.network} station {device.station}, "
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
            for request in group.requests:
                lines.append(f"    {request.describe()}")
                if request.mode == "random":
                    lines.extend(f"      instead of {p.describe()}" for p in request.parts)
        lines.append(f"  total: {per_second:.3g} requests/s")
    return "\n".join(lines)
