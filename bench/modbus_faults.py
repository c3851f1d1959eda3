"""Modbus fault timing: how long until a faulty device reports bad quality with its
reason, and how regular the polls of the healthy devices stay meanwhile.

    .venv/bin/python bench/modbus_faults.py [--seconds-per-fault 4] [--healthy 3]

In one process: the real pymodbus simulator serves the healthy devices and the faulty
one; the faulty device is reached through tests/support/proxy.py FaultProxy (link
faults) or points at tests/support/bad_modbus.py (malformed frames). Every device runs
the agent's own DevicePoller with the real ModbusDriver. For each fault it prints the
time from switching the fault on to the first bad sample (and its reason) next to the
bound `timeout_s × (retries + 1) + interval_s`, the time back to good after the fault is
removed, and the interval between polls of the healthy devices during the fault
(p50 / p99 / max; nominal = their interval_s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.logs import setup_logging
from agent.poller import DevicePoller
from drivers.base import RawReading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import ModbusSimulator
from tests.support.bad_modbus import BadModbusServer, Mode
from tests.support.proxy import FaultProxy

FAULTY_INTERVAL_S = 0.5
TIMEOUT_S = 0.5
RETRIES = 1
HEALTHY_INTERVAL_S = 0.1


def make_device(name: str, port: int, interval_s: float) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "name": name,
            "protocol": "modbus",
            "host": "127.0.0.1",
            "port": port,
            "interval_s": interval_s,
            "timeout_s": TIMEOUT_S,
            "retries": RETRIES,
            "backoff_min_s": 0.2,
            "backoff_max_s": 1.0,
            "tags": [
                {"name": "a", "address": 0, "type": "uint16"},
                {"name": "b", "address": 1, "type": "float32"},
            ],
        }
    )


@dataclass
class Recorder:
    """Sink of every poller: (time, device, readings) of each poll."""

    polls: list[tuple[float, str, list[RawReading]]] = field(default_factory=list)

    def sink_for(self, name: str) -> Callable[[Sequence[RawReading]], object]:
        async def sink(readings: Sequence[RawReading]) -> None:
            self.polls.append((asyncio.get_running_loop().time(), name, list(readings)))

        return sink


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_fault(
    label: str,
    faulty: ModbusDevice,
    healthy: list[ModbusDevice],
    switch_on: Callable[[], None],
    switch_off: Callable[[], None],
    seconds: float,
) -> str:
    rec = Recorder()
    pollers = [
        DevicePoller(d, "modbus", ModbusDriver(d), {"default": ["a", "b"]}, rec.sink_for(d.name))  # type: ignore[arg-type]
        for d in [faulty, *healthy]
    ]
    tasks = [asyncio.create_task(p.run(), name=f"poll:{p.device.name}") for p in pollers]
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(switch_on)
        on = loop.time()
        await asyncio.sleep(seconds)
        await asyncio.to_thread(switch_off)
        off = loop.time()
        await asyncio.sleep(max(3.0, faulty.backoff_max_s * 2))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first_bad = next(
        ((t, r) for t, n, r in rec.polls if n == faulty.name and t >= on and r[0].quality == "bad"),
        None,
    )
    back = next(
        (t for t, n, r in rec.polls if n == faulty.name and t >= off and r[0].quality == "good"),
        None,
    )
    gaps: list[float] = []
    healthy_bad = 0
    for d in healthy:
        times = [t for t, n, _ in rec.polls if n == d.name and on <= t <= off]
        gaps.extend(b - a for a, b in itertools.pairwise(times))
        healthy_bad += sum(
            1 for t, n, r in rec.polls if n == d.name and any(x.quality != "good" for x in r)
        )
    bad_s = f"{first_bad[0] - on:6.3f} s" if first_bad else "   none "
    reason = first_bad[1][0].reason if first_bad else "-"
    back_s = f"{back - off:6.3f} s" if back is not None else "   never"
    ms = [g * 1000 for g in gaps]
    jitter = (
        f"{statistics.median(ms):6.1f} {percentile(ms, 0.99):6.1f} {max(ms):6.1f}" if ms else "-"
    )
    return f"{label:16s} {bad_s}  {reason:40s} {back_s}   {jitter}   {len(ms):4d} {healthy_bad:3d}"


async def main(seconds: float, n_healthy: int) -> None:
    sim_devices = [make_device(f"healthy{i}", 0, HEALTHY_INTERVAL_S) for i in range(n_healthy)]
    sim_devices.append(make_device("target", 0, FAULTY_INTERVAL_S))
    bound = TIMEOUT_S * (RETRIES + 1) + FAULTY_INTERVAL_S
    print(
        f"faulty device: interval {FAULTY_INTERVAL_S} s, timeout {TIMEOUT_S} s, retries "
        f"{RETRIES} -> bound timeout x (retries + 1) + interval = {bound} s; "
        f"{n_healthy} healthy devices every {HEALTHY_INTERVAL_S * 1000:.0f} ms"
    )
    print(
        f"{'fault':16s} {'to bad':>8s}  {'reason':40s} {'to good':>8s}   "
        "healthy poll interval ms p50/p99/max   n  bad"
    )
    async with ModbusSimulator(sim_devices) as sim:
        healthy = [
            make_device(d.name, sim.endpoints[d.name][1], HEALTHY_INTERVAL_S)
            for d in sim_devices[:-1]
        ]
        with FaultProxy(*sim.endpoints["target"]) as proxy:
            faulty = make_device("target", proxy.port, FAULTY_INTERVAL_S)

            def back() -> None:
                proxy.set_mode("pass")

            link: list[tuple[str, Callable[[], None]]] = [
                ("down (cut)", lambda: proxy.set_mode("cut")),
                ("silent", lambda: proxy.set_mode("blackhole")),
                ("slow (2 s)", lambda: proxy.set_mode("delay", delay_s=2.0)),
                ("reset 30 B", lambda: proxy.set_mode("reset_after", reset_after_bytes=30)),
            ]
            for label, on in link:
                print(await run_fault(label, faulty, healthy, on, back, seconds), flush=True)
        with BadModbusServer() as bad:
            faulty = make_device("target", bad.port, FAULTY_INTERVAL_S)
            frames: list[Mode] = ["wrong_tid", "wrong_function", "short_count", "bad_length"]
            for mode in frames:

                def on(mode: Mode = mode) -> None:
                    bad.set_mode(mode)

                print(
                    await run_fault(mode, faulty, healthy, on, lambda: bad.set_mode("ok"), seconds),
                    flush=True,
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-fault", type=float, default=4.0)
    parser.add_argument("--healthy", type=int, default=3)
    args = parser.parse_args()
    setup_logging("error", "json")  # the table is the output; the agent's logs are noise
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.seconds_per_fault, args.healthy))
