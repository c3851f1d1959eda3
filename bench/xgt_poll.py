"""Bench scenario: one XGT PLC (the real XgtSimulator), 500 tags across word and bit areas
polled every 100 ms by the real agent process, delivered to a real mosquitto.

    python -m bench.xgt_poll [--measure-s 20] [--warmup-s 5] [--tags 500]

Prints one JSON object: values/s delivered, CPU seconds of the agent (and of the
simulator and broker) per million values, requests per poll measured at the simulator
against the plan, bad samples, latency from `ts_agent` to arrival. The tags: int16 and
float32 words of D, bits of M and P, and timer contacts (individual reads), so the plan
has both continuous and individual reads.

`python -m bench.xgt_poll --serve CONFIG` is the simulator process it starts: it prints
`{"endpoints": ...}` once listening, `{"requests": ...}` on SIGUSR1, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from agent.config import load_config
from bench.harness import Child, Meter, cpu_seconds, latency_ms, machine
from drivers.xgt.config import XgtDevice
from drivers.xgt.plan import plan_device
from drivers.xgt.simulator import XgtSimulator
from tests.support.broker import MosquittoBroker


def tags(n: int) -> list[dict[str, Any]]:
    """`n` tags: 40 % D words (int16, every fifth a float32), 40 % M bits, 16 % P bits,
    4 % timer contacts."""
    out: list[dict[str, Any]] = []
    word = 0
    for i in range(n):
        share = i * 100 // n
        if share < 40:
            if i % 5 == 4:
                out.append({"name": f"f{i}", "address": f"%DW{word}", "type": "float32"})
                word += 2
            else:
                out.append({"name": f"w{i}", "address": f"%DW{word}", "type": "int16"})
                word += 1
        elif share < 80:
            out.append({"name": f"m{i}", "address": f"%MX{i}"})
        elif share < 96:
            out.append({"name": f"p{i}", "address": f"%PX{i}"})
        else:
            out.append({"name": f"t{i}", "address": f"%TX{i}"})
    return out


def write_config(path: Path, host: str, port: int, n: int, mqtt_port: int, buffer: Path) -> None:
    config = {
        "agent": {"id": "bench"},
        "buffer": {"path": str(buffer), "max_bytes": 1 << 30},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "topic": "bench/{device}"},
        "logging": {"level": "info", "format": "json"},
        "devices": [
            {
                "name": "xgt1",
                "protocol": "xgt",
                "host": host,
                "port": port,
                "cpu": "XGK",
                "interval_s": 0.1,
                "tags": tags(n),
            }
        ],
    }
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))


async def serve(config_path: str) -> None:
    config = load_config(config_path)
    devices = [d for d in config.devices if isinstance(d, XgtDevice)]
    sim = XgtSimulator(devices, update_interval_s=0.05)
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


def measure(n: int, warmup_s: float, measure_s: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-xgt-"))
    broker = MosquittoBroker(
        extra_config=["max_inflight_messages 100", "max_queued_messages 0"],
        log_types=("error", "warning"),
    )
    children: list[Child] = []
    meter: Meter | None = None
    try:
        broker.start()
        sim_cfg = tmp / "sim.yaml"
        write_config(sim_cfg, "127.0.0.1", 0, n, broker.port, tmp / "unused.db")
        sim = Child(
            "simulator",
            [sys.executable, "-m", "bench.xgt_poll", "--serve", str(sim_cfg)],
            tmp / "sim.log",
        ).start()
        children.append(sim)
        host, port = sim.json_line(120)["endpoints"]["xgt1"]
        cfg = tmp / "agent.yaml"
        write_config(cfg, host, port, n, broker.port, tmp / "buffer.db")
        device = next(d for d in load_config(cfg).devices if isinstance(d, XgtDevice))
        planned = len(plan_device(device).groups["default"].requests)
        meter = Meter(broker.host, broker.port, "bench/#").start()
        agent = Child(
            "agent", [sys.executable, "-m", "agent.cli", "run", str(cfg)], tmp / "agent.log"
        ).start()
        children.append(agent)
        if not meter.wait_values(1, 90):
            raise RuntimeError(f"no value within 90 s; {agent.tail()}")
        time.sleep(warmup_s)
        procs = {"agent": agent.pid, "simulator": sim.pid}
        if broker.pid is not None:
            procs["broker"] = broker.pid

        def mark() -> tuple[float, dict[str, float], int, int, int]:
            sim.signal(signal.SIGUSR1)
            requests = int(sim.json_line(10)["requests"]["xgt1"])
            values, messages = meter.snapshot() if meter else (0, 0)
            return (
                time.time(),
                {k: cpu_seconds(p) for k, p in procs.items()},
                values,
                messages,
                requests,
            )

        t0, cpu0, v0, m0, r0 = mark()
        time.sleep(measure_s)
        t1, cpu1, v1, m1, r1 = mark()
        agent.stop(60)
        elapsed = t1 - t0
        values, polls, requests = v1 - v0, m1 - m0, r1 - r0
        per_million = {
            k: round((cpu1[k] - cpu0[k]) / values * 1e6, 2) if values else None for k in cpu1
        }
        window = [a for a in meter.stats.arrivals if t0 <= a.t <= t1]
        return {
            "scenario": f"xgt {n} tags at 100 ms",
            "machine": machine(),
            "measure_s": round(elapsed, 1),
            "values_per_s": round(values / elapsed, 1),
            "polls_per_s": round(polls / elapsed, 2),
            "cpu_s_per_million_values": per_million,
            "requests_per_poll_planned": planned,
            "requests_per_poll_measured": round(requests / polls, 2) if polls else None,
            "bad_samples": meter.stats.bad,
            "duplicates": meter.stats.duplicates,
            "agent_latency_ms": latency_ms([a.t - a.ts_agent for a in window]),
        }
    finally:
        if meter is not None:
            meter.close()
        for child in reversed(children):
            child.stop(30)
        broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="XGT FEnet polling bench")
    parser.add_argument("--serve", metavar="CONFIG", help="run the simulator process")
    parser.add_argument("--tags", type=int, default=500)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--measure-s", type=float, default=20.0)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    result = measure(args.tags, args.warmup_s, args.measure_s)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
