"""Request planning for a Modbus device: which block reads one poll of a group makes.

Made once when the driver starts (pure: no network). Rules, per poll group and table:

- tags are sorted by address and merged into one request while the unused registers
  (bits) between them are at most `max_gap`, and the request stays within the cap:
  min(125, max_registers_per_request) registers, min(2000, max_bits_per_request) bits;
- a multi-register value is never split across two requests; a single value larger than
  the cap is a config error (ValueError naming the tag);
- tags that overlap (several `bit` tags of one register, a value read twice under two
  names) share the registers of one request;
- groups are planned separately, so each group's poll reads only its own tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drivers.links import LinkConfig, link_timing
from drivers.modbus import rtu
from drivers.modbus.codec import BlockDecoder, ValueSpec
from drivers.modbus.config import ByteOrder, ModbusDevice, ModbusTag, Table

__all__ = [
    "FUNCTION_CODE",
    "MAX_BITS",
    "MAX_REGISTERS",
    "DevicePlan",
    "GroupPlan",
    "LinkPlan",
    "Request",
    "TagSlot",
    "clusters",
    "format_link_plans",
    "format_plan",
    "link_plan",
    "plan_device",
    "plan_requests",
    "sub_request",
]

MAX_REGISTERS = 125
MAX_BITS = 2000
TABLE_ORDER: tuple[Table, ...] = ("coil", "discrete_input", "holding", "input")
FUNCTION_CODE: dict[Table, int] = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}


@dataclass(frozen=True, slots=True)
class TagSlot:
    """One tag inside a request: `index` is its position in the group (config order),
    `offset` its first register (bit) relative to the request's start."""

    index: int
    tag: str
    offset: int
    spec: ValueSpec


@dataclass(frozen=True, slots=True)
class Request:
    """One block read: `count` registers (bits) of `table` from `start` (0-based)."""

    table: Table
    start: int
    count: int
    slots: tuple[TagSlot, ...]
    decoder: BlockDecoder

    @property
    def function_code(self) -> int:
        """Modbus function code of the read (1, 2, 3 or 4)."""
        return FUNCTION_CODE[self.table]

    @property
    def is_bits(self) -> bool:
        """True for coil and discrete-input reads."""
        return self.table in ("coil", "discrete_input")

    def describe(self) -> str:
        """e.g. `holding 0..124 (125 registers, 63 tags)`."""
        unit = "bits" if self.is_bits else "registers"
        if self.count == 1:
            unit = unit[:-1]
        tags = len(self.slots)
        return (
            f"{self.table} {self.start}..{self.start + self.count - 1} "
            f"({self.count} {unit}, {tags} tag{'' if tags == 1 else 's'})"
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
    """Every poll group of one device, keyed by group name."""

    device: str
    groups: dict[str, GroupPlan]


def _caps(device: ModbusDevice) -> tuple[int, int]:
    return (
        min(MAX_REGISTERS, device.max_registers_per_request),
        min(MAX_BITS, device.max_bits_per_request),
    )


def plan_requests(
    tags: Sequence[ModbusTag],
    *,
    byte_order: ByteOrder = "ABCD",
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
    max_gap: int = 0,
) -> list[Request]:
    """Merge `tags` (one group, in config order) into block reads.

    Slot indexes refer to positions in `tags`. Requests are ordered by table
    (coil, discrete_input, holding, input), then address. Raises ValueError when a single
    value is larger than the cap.
    """
    cap_regs = min(MAX_REGISTERS, max_registers)
    cap_bits = min(MAX_BITS, max_bits)
    by_table: dict[Table, list[tuple[int, int, int, ModbusTag]]] = {}
    for index, tag in enumerate(tags):
        table = tag.resolved_table()
        start = tag.resolved_address()
        count = tag.register_count()
        cap = cap_bits if table in ("coil", "discrete_input") else cap_regs
        if count > cap:
            unit = "bits" if table in ("coil", "discrete_input") else "registers"
            raise ValueError(
                f"tag {tag.name!r}: a {tag.type} of {count} {unit} is larger than the "
                f"{cap} {unit} this device allows per request"
            )
        by_table.setdefault(table, []).append((start, count, index, tag))

    requests: list[Request] = []
    for table in TABLE_ORDER:
        entries = sorted(by_table.get(table, ()), key=lambda e: (e[0], -e[1], e[2]))
        cap = cap_bits if table in ("coil", "discrete_input") else cap_regs
        current: list[tuple[int, int, int, ModbusTag]] = []
        req_start = req_end = 0  # req_end is exclusive
        for entry in entries:
            start, count, _, _ = entry
            end = start + count
            if current and start - req_end <= max_gap and max(req_end, end) - req_start <= cap:
                current.append(entry)
                req_end = max(req_end, end)
                continue
            if current:
                requests.append(_make_request(table, req_start, req_end, current, byte_order))
            current = [entry]
            req_start, req_end = start, end
        if current:
            requests.append(_make_request(table, req_start, req_end, current, byte_order))
    return requests


def _make_request(
    table: Table,
    start: int,
    end: int,
    entries: list[tuple[int, int, int, ModbusTag]],
    byte_order: ByteOrder,
) -> Request:
    slots = tuple(
        TagSlot(
            index=index,
            tag=tag.name,
            offset=addr - start,
            spec=ValueSpec.from_tag(tag, byte_order),
        )
        for addr, _, index, tag in entries
    )
    decoder = BlockDecoder([(s.offset, s.spec) for s in slots])
    return Request(table=table, start=start, count=end - start, slots=slots, decoder=decoder)


def clusters(request: Request) -> list[tuple[TagSlot, ...]]:
    """The smallest pieces `request` can be split into, in address order.

    Slots whose registers (bits) overlap stay together: a multi-register value is never
    split, and several `bit` tags of one register are read by one request. Used by the
    driver to isolate the tags that make a merged block fail.
    """
    ordered = sorted(request.slots, key=lambda s: (s.offset, -s.spec.register_count, s.index))
    out: list[list[TagSlot]] = []
    end = -1  # exclusive end of the current cluster
    for slot in ordered:
        slot_end = slot.offset + slot.spec.register_count
        if out and slot.offset < end:
            out[-1].append(slot)
            end = max(end, slot_end)
        else:
            out.append([slot])
            end = slot_end
    return [tuple(c) for c in out]


def sub_request(request: Request, slots: Sequence[TagSlot]) -> Request:
    """A request reading only `slots` (a subset of `request.slots`), from the first
    register (bit) of the first slot to the last of the last one."""
    if not slots:
        raise ValueError("a sub-request needs at least one slot")
    first = min(s.offset for s in slots)
    last = max(s.offset + s.spec.register_count for s in slots)
    ordered = sorted(slots, key=lambda s: (s.offset, -s.spec.register_count, s.index))
    moved = tuple(
        TagSlot(index=s.index, tag=s.tag, offset=s.offset - first, spec=s.spec) for s in ordered
    )
    decoder = BlockDecoder([(s.offset, s.spec) for s in moved])
    return Request(
        table=request.table,
        start=request.start + first,
        count=last - first,
        slots=moved,
        decoder=decoder,
    )


def plan_device(device: ModbusDevice) -> DevicePlan:
    """The plan of every poll group of `device`. Raises ValueError on a tag whose group
    is not declared or whose value is larger than the per-request cap."""
    intervals = device.group_intervals()
    members: dict[str, list[ModbusTag]] = {name: [] for name in intervals}
    for tag in device.tags:
        if tag.group not in members:
            known = ", ".join(sorted(intervals))
            raise ValueError(
                f"device {device.name!r} tag {tag.name!r}: poll group {tag.group!r} is not "
                f"declared (known: {known})"
            )
        members[tag.group].append(tag)
    cap_regs, cap_bits = _caps(device)
    groups: dict[str, GroupPlan] = {}
    for name, tags in members.items():
        if not tags:
            continue
        requests = plan_requests(
            tags,
            byte_order=device.byte_order,
            max_registers=cap_regs,
            max_bits=cap_bits,
            max_gap=device.max_gap,
        )
        groups[name] = GroupPlan(
            group=name,
            interval_s=intervals[name],
            tags=tuple(t.name for t in tags),
            requests=tuple(requests),
        )
    return DevicePlan(device=device.name, groups=groups)


def _fmt_interval(seconds: float) -> str:
    return f"{seconds:g} s"


def format_plan(devices: ModbusDevice | Sequence[ModbusDevice]) -> str:
    """Human-readable plan for `edge-agent plan CONFIG`: per device, per group, each
    request and the number of requests per poll. Raises ValueError like plan_device."""
    if isinstance(devices, ModbusDevice):
        devices = [devices]
    lines: list[str] = []
    for device in devices:
        plan = plan_device(device)
        lines.append(
            f"device {device.name} (modbus {device.endpoint} unit {device.unit_id}, "
            f"{len(device.tags)} tags)"
        )
        per_second = 0.0
        for group in plan.groups.values():
            n, tags = len(group.requests), len(group.tags)
            per_second += n / group.interval_s
            lines.append(
                f"  group {group.group} every {_fmt_interval(group.interval_s)}: "
                f"{tags} tag{'' if tags == 1 else 's'}, {n} request{'' if n == 1 else 's'} per poll"
            )
            lines.extend(f"    {request.describe()}" for request in group.requests)
        lines.append(f"  total: {per_second:.3g} requests/s")
    return "\n".join(lines)


# ------------------------------------------------------------------ links


@dataclass(frozen=True, slots=True)
class LinkPlan:
    """Bus time of the units on one link.

    `per_group[(device, group)]` is the bus time of one poll of that group (seconds, 0
    when the link has no serial timing); `cycle_s` the bus time of one poll of every
    group of every unit; `load` the fraction of the line's time the configured
    intervals need (Σ poll time / interval). Above 1 the polls cannot fit the baud rate.
    """

    link: str
    baud: int | None
    per_group: dict[tuple[str, str], tuple[float, float, int]]  # (bus s, interval s, requests)
    cycle_s: float
    load: float
    requests_per_s: float
    worst_timeout_s: float

    @property
    def fits(self) -> bool:
        """False when the configured intervals need more than the line's time."""
        return self.load <= 1.0


def link_plan(name: str, config: LinkConfig, devices: Sequence[ModbusDevice]) -> LinkPlan:
    """The bus time of every poll group of `devices` (the units on link `name`)."""
    timing = link_timing(config)
    turnaround = config.turnaround_s
    per_group: dict[tuple[str, str], tuple[float, float, int]] = {}
    cycle = load = rate = 0.0
    worst = 0.0
    for device in devices:
        if device.link != name or not device.enabled:
            continue
        worst = max(worst, device.timeout_s)
        for group in plan_device(device).groups.values():
            bus = 0.0
            if timing is not None:
                bus = sum(
                    rtu.exchange_s(timing, r.function_code, r.count, turnaround)
                    for r in group.requests
                )
            per_group[(device.name, group.group)] = (bus, group.interval_s, len(group.requests))
            cycle += bus
            load += bus / group.interval_s
            rate += len(group.requests) / group.interval_s
    return LinkPlan(
        link=name,
        baud=timing.baud if timing is not None else None,
        per_group=per_group,
        cycle_s=cycle,
        load=load,
        requests_per_s=rate,
        worst_timeout_s=worst,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def format_link_plans(
    links: dict[str, LinkConfig], devices: Sequence[ModbusDevice]
) -> tuple[str, list[str]]:
    """(text, warnings) for `edge-agent plan`: per link, the bus time of each unit's
    poll groups against their intervals, one whole cycle, the line's load, and a warning
    for every link whose intervals cannot fit its baud rate."""
    lines: list[str] = []
    warnings: list[str] = []
    for name, config in links.items():
        plan = link_plan(name, config, devices)
        units = len({d for d, _ in plan.per_group})
        where = getattr(config, "port", "")
        if not isinstance(where, str):
            where = f"{getattr(config, 'host', '')}:{where}"
        speed = f", {plan.baud} baud" if plan.baud is not None else ""
        lines.append(f"link {name} ({config.type} {where}{speed}, {units} units)")
        if plan.baud is None:
            lines.append(
                f"  {plan.requests_per_s:.3g} requests/s (no serial timing: give `baud` for a "
                "gateway in front of a serial line)"
            )
            continue
        for (device, group), (bus, interval, n) in plan.per_group.items():
            lines.append(
                f"  {device} {group}: {n} request{'' if n == 1 else 's'}, {_ms(bus)} of bus "
                f"time every {_fmt_interval(interval)} ({100 * bus / interval:.1f}%)"
            )
        lines.append(
            f"  one cycle of every group: {_ms(plan.cycle_s)}; line load {100 * plan.load:.0f}%; "
            f"a silent unit costs up to {_fmt_interval(plan.worst_timeout_s)} once per suspension"
        )
        if not plan.fits:
            warnings.append(
                f"link {name}: the configured intervals need {100 * plan.load:.0f}% of the "
                f"line's time at {plan.baud} baud; polls will overrun and be skipped "
                "(raise the baud rate, lengthen intervals or split the line)"
            )
    return "\n".join(lines), warnings
