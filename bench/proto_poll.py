"""Prototype measurement: how long one poll of the modbus-wide device takes, with the
agent's own ModbusDriver and nothing else (no normalizer, buffer or MQTT).

    .venv/bin/python -m bench.proto_poll [--devices 10] [--seconds 15] [--uvloop]

Starts the bench simulator (its own process) with the modbus-wide devices, then polls
every device back to back on the 100 ms schedule from this process, and prints polls/s,
poll duration p50/p99 and this process's CPU per value. It separates the cost of the
Modbus round trips (driver + simulator) from the rest of the pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Child, cpu_seconds
from bench.scenarios import SCENARIOS, modbus_devices, write_config
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver


async def poll_device(driver: ModbusDriver, until: float, durations: list[float]) -> int:
    loop = asyncio.get_running_loop()
    await driver.connect()
    values = 0
    due = loop.time()
    while loop.time() < until:
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = loop.time()
        values += len((await driver.read_columns("default"))[1])
        durations.append(loop.time() - t0)
        due += 0.1
        if due < loop.time():
            due = loop.time()
    await driver.close()
    return values


async def main(devices: int, seconds: float, sim: Child) -> None:
    endpoints = sim.json_line(60)["endpoints"]
    s = SCENARIOS["modbus-wide"]
    cfgs = [
        ModbusDevice.model_validate(d)
        for d in modbus_devices(s, {k: (v[0], v[1]) for k, v in endpoints.items()})
    ][:devices]
    drivers = [ModbusDriver(d) for d in cfgs]
    durations: list[float] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    cpu0, sim0, t0 = time.process_time(), cpu_seconds(sim.pid), time.time()
    counts = await asyncio.gather(*(poll_device(d, until, durations) for d in drivers))
    wall = time.time() - t0
    cpu, sim_cpu = time.process_time() - cpu0, cpu_seconds(sim.pid) - sim0
    durations.sort()
    values = sum(counts)
    print(
        f"devices {devices}: {values / wall:,.0f} values/s ({len(durations) / wall:.1f} polls/s, "
        f"expected {devices * 10}), poll p50 {durations[len(durations) // 2] * 1000:.1f} ms "
        f"p99 {durations[int(len(durations) * 0.99)] * 1000:.1f} ms; client CPU "
        f"{100 * cpu / wall:.0f} % ({cpu / values * 1e6:.2f} µs/value), simulator CPU "
        f"{100 * sim_cpu / wall:.0f} %"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="poll duration of the modbus-wide device")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-proto-"))
    write_config(tmp / "sim.yaml", modbus_devices(SCENARIOS["modbus-wide"], None), tmp / "x", 1)
    child = Child(
        "simulator",
        [sys.executable, "-m", "bench.sim_modbus", str(tmp / "sim.yaml")],
        tmp / "sim.log",
    ).start()
    try:
        if args.uvloop:
            import uvloop

            uvloop.install()
        asyncio.run(main(args.devices, args.seconds, child))
    finally:
        child.stop()
        shutil.rmtree(tmp, ignore_errors=True)
