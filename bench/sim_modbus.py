"""Bench-only Modbus simulator process: the real `ModbusSimulator`, plus a clock tag.

    python -m bench.sim_modbus CONFIG [--update-interval-s S]

Serves the Modbus devices of CONFIG like `edge-agent simulate` does, except that every
tag named `clock` (a uint32) holds the wall-clock time in milliseconds (modulo 2**32) at
the moment the simulator wrote the device's register table. A subscriber that receives a
sample of `clock` knows when the value it travels with was written, which is what the
end-to-end latency figure measures.

Prints one JSON line `{"endpoints": {device: [host, port]}}` once listening; on SIGUSR1
prints `{"requests": {device: n}}` (requests received so far); stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import orjson

from agent.config import load_config
from drivers.base import Scalar
from drivers.modbus.config import ModbusDevice
from drivers.modbus.simulator import ModbusSimulator

CLOCK_TAG = "clock"


def _clock(t: float) -> Scalar:
    return time.time_ns() // 1_000_000 % (1 << 32)


def install_clocks(sim: ModbusSimulator) -> int:
    """Point every `clock` tag's generator at the wall clock; returns how many."""
    n = 0
    # Bench-only reach into the simulator's per-tag state: the simulator has no hook for
    # a value that is not a function of its own start time.
    for unit in sim._units.values():
        for sim_tags in unit.tags.values():
            for st in sim_tags:
                if st.tag.name == CLOCK_TAG:
                    st.generator = _clock
                    n += 1
    return n


async def serve(config_path: str, update_interval_s: float) -> None:
    config = load_config(config_path)
    devices = [d for d in config.devices if isinstance(d, ModbusDevice)]
    sim = ModbusSimulator(devices, update_interval_s=update_interval_s)
    install_clocks(sim)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def report() -> None:
        counts = {d.name: sim.request_count(d.name) for d in devices}
        sys.stdout.write(orjson.dumps({"requests": counts}).decode() + "\n")
        sys.stdout.flush()

    loop.add_signal_handler(signal.SIGUSR1, report)
    async with sim:
        sys.stdout.write(orjson.dumps({"endpoints": sim.endpoints}).decode() + "\n")
        sys.stdout.flush()
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="bench Modbus simulator with clock tags")
    parser.add_argument("config")
    parser.add_argument("--update-interval-s", type=float, default=0.05)
    args = parser.parse_args()
    asyncio.run(serve(args.config, args.update_interval_s))


if __name__ == "__main__":
    main()
