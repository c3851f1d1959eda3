"""Shared links: bus time per cycle against `plan`, and what a dead unit costs the others.

    .venv/bin/python bench/modbus_links.py [--seconds 10] [--units 8] [--baud 19200]

In one process: LinkSimulator serves N units on a pty pair (serial link) and N behind a
simulated serial device server (RTU over TCP, 9,600 baud), with the line's timing
(request and answer on the wire, silences, 0.5 ms reaction per unit). Every unit runs
the agent's own DevicePoller with the real ModbusDriver on the shared Link, at an
interval chosen so the line is about half loaded. Two runs per link: all units
answering, then unit 3 silent. Printed per run: the planned bus time of one cycle, the
measured link busy time per cycle (link.stats.busy_s / polls per unit), the polls per
unit (all should get the same number), the poll intervals of the healthy units (p50 /
p99 / max against nominal), and the timeouts the dead unit cost (count × timeout_s).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.logs import setup_logging
from agent.poller import DevicePoller
from drivers.base import RawReading
from drivers.links import Link, RtuOverTcpLink, SerialLink
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import link_plan
from drivers.modbus.simulator import LinkSimulator

TIMEOUT_S = 0.2


def make_unit(link: str, unit_id: int, interval_s: float) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "name": f"{link}-u{unit_id}",
            "protocol": "modbus",
            "link": link,
            "unit_id": unit_id,
            "interval_s": interval_s,
            "timeout_s": TIMEOUT_S,
            "retries": 0,
            "backoff_min_s": 1.0,
            "backoff_max_s": 5.0,
            "tags": [
                {"name": "power", "address": 0, "type": "float32"},
                {"name": "energy", "address": 2, "type": "uint32"},
                {"name": "volts", "address": 4, "type": "float32"},
                {"name": "on", "address": 0, "table": "coil", "type": "bool"},
            ],
        }
    )


@dataclass
class Recorder:
    polls: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)

    def sink_for(self, name: str) -> Callable[[Sequence[RawReading]], Any]:
        async def sink(readings: Sequence[RawReading]) -> None:
            good = all(r.quality == "good" for r in readings)
            stamp = asyncio.get_running_loop().time()
            self.polls.setdefault(name, []).append((stamp, good))

        return sink


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def run(link_name: str, config: Any, n: int, seconds: float, dead: set[int]) -> str:
    # Interval: about twice the planned cycle, rounded up to 0.1 s.
    probe = [make_unit(link_name, u, 1.0) for u in range(1, n + 1)]
    cycle = link_plan(link_name, config, probe).cycle_s
    interval = max(0.1, round(2 * cycle + 0.05, 1))
    devices = [make_unit(link_name, u, interval) for u in range(1, n + 1)]
    plan = link_plan(link_name, config, devices)
    rec = Recorder()
    async with LinkSimulator({link_name: config}, devices, silent_units={link_name: dead}) as sim:
        link = Link(link_name, sim.links[link_name])
        pollers = [
            DevicePoller(
                d,
                "modbus",
                ModbusDriver(d, link=link),
                {"default": [t.name for t in d.tags]},
                rec.sink_for(d.name),
            )
            for d in devices
        ]
        tasks = [asyncio.create_task(p.run(), name=f"poll:{p.device.name}") for p in pollers]
        try:
            await asyncio.sleep(seconds)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await link.close()
    healthy = [d.name for d in devices if d.unit_id not in dead]
    gaps: list[float] = []
    good_polls = []
    for name in healthy:
        stamps = [t for t, _ in rec.polls.get(name, [])]
        gaps += [b - a for a, b in itertools.pairwise(stamps)]
        good_polls.append(sum(1 for _, ok in rec.polls.get(name, []) if ok))
    polls = max(good_polls) if good_polls else 0
    busy_per_cycle = link.stats.busy_s / polls if polls else 0.0
    label = "all answering" if not dead else f"unit {sorted(dead)} silent"
    lines = [
        f"{link_name} ({config.type}, {config.baud} baud), {n} units every {interval:g} s, "
        f"{label}:",
        f"  plan: {plan.cycle_s * 1000:.1f} ms bus time per cycle; measured busy "
        f"{busy_per_cycle * 1000:.1f} ms per cycle ({link.stats.transactions} transactions)",
        f"  good polls per healthy unit: min {min(good_polls)} max {max(good_polls)} in "
        f"{seconds:g} s (nominal {seconds / interval:.0f})",
        f"  healthy poll interval p50 {percentile(gaps, 0.5) * 1000:.0f} ms, p99 "
        f"{percentile(gaps, 0.99) * 1000:.0f} ms, max {max(gaps, default=0) * 1000:.0f} ms "
        f"(nominal {interval * 1000:.0f} ms)",
    ]
    if dead:
        lines.append(
            f"  dead unit: {link.stats.timeouts} timeouts x {TIMEOUT_S * 1000:.0f} ms = "
            f"{link.stats.timeouts * TIMEOUT_S:.1f} s of bus time in {seconds:g} s; "
            f"{link.stats.suspended} requests refused while suspended (cost 0)"
        )
    return "\n".join(lines)


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--baud", type=int, default=19200)
    args = parser.parse_args(argv)
    setup_logging("error")
    links: list[tuple[str, Any]] = [
        ("line1", SerialLink(type="serial", port="/dev/ttyUSB0", baud=args.baud)),
        ("nport", RtuOverTcpLink(type="rtu_over_tcp", host="127.0.0.1", port=0, baud=9600)),
    ]
    for name, config in links:
        for dead in (set(), {3}):
            print(await run(name, config, args.units, args.seconds, dead), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
