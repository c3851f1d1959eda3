"""Bench-only OPC UA simulator process: the real `OpcUaSimulator` with a chosen refresh.

    python -m bench.sim_opcua CONFIG [--update-interval-s S]

`edge-agent simulate` refreshes every 0.1 s, which for 10,000 nodes would make the
simulator, not the agent, the bottleneck of a 2-core machine; the benchmarks want values
that change at 1 Hz. Every written value carries SourceTimestamp = the write time, so
the end-to-end latency is arrival − ts_source. Prints `{"endpoints": {device: url}}` once
serving; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import orjson

from agent.config import load_config
from drivers.opcua.config import OpcUaDevice
from drivers.opcua.simulator import OpcUaSimulator


async def serve(config_path: str, update_interval_s: float, cert_dir: str) -> None:
    config = load_config(config_path)
    devices = [d for d in config.devices if isinstance(d, OpcUaDevice)]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sim = OpcUaSimulator(devices, cert_dir=Path(cert_dir), update_interval_s=update_interval_s)
    async with sim:
        sys.stdout.write(orjson.dumps({"endpoints": sim.endpoints}).decode() + "\n")
        sys.stdout.flush()
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="bench OPC UA simulator")
    parser.add_argument("config")
    parser.add_argument("--update-interval-s", type=float, default=1.0)
    parser.add_argument("--cert-dir", default="pki/simulator")
    args = parser.parse_args()
    asyncio.run(serve(args.config, args.update_interval_s, args.cert_dir))


if __name__ == "__main__":
    main()
