"""S7 bench scenario: one S7 CPU x 500 tags (DB REALs and INTs, M/I bits, Q words) @ 100 ms.

    python -m bench.s7_poll [--measure-s 30] [--warmup-s 5] [--quick]
    python -m bench.s7_poll --serve CONFIG      # the simulator process (used by the above)

The real stack, each part in its own process: mosquitto, the S7 simulator
(`drivers.s7.simulator.S7Simulator`), the agent (`python -m agent.cli run CONFIG`) and the
measuring subscriber (`bench.harness.Meter`). Prints one JSON line: values/s delivered
against the 5,000 expected, agent CPU % and CPU seconds per million values, requests per
poll measured at the simulator against the plan.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

TAGS = 500
INTERVAL_S = 0.1


def device(port: int) -> dict[str, Any]:
    tags: list[dict[str, Any]] = []
    for i in range(200):
        tags.append({"name": f"t{i}", "address": f"DB10.DBD{4 * i}", "type": "real"})
    for i in range(100):
        tags.append({"name": f"p{i}", "address": f"DB20.DBW{2 * i}", "type": "int"})
    for i in range(100):
        tags.append({"name": f"m{i}", "address": f"M{i // 8}.{i % 8}"})
    for i in range(50):
        tags.append({"name": f"i{i}", "address": f"I{i // 8}.{i % 8}"})
    for i in range(50):
        tags.append({"name": f"q{i}", "address": f"QW{2 * i}", "type": "word"})
    assert len(tags) == TAGS
    return {
        "name": "cpu1",
        "protocol": "s7",
        "host": "127.0.0.1",
        "port": port,
        "interval_s": INTERVAL_S,
        "tags": tags,
    }


def write_config(path: Path, port: int, mqtt_port: int, buffer: Path) -> None:
    config = {
        "agent": {"id": "bench-s7"},
        "buffer": {"path": str(buffer)},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "topic": "bench/{device}"},
        "logging": {"level": "info", "format": "json"},
        "devices": [device(port)],
    }
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))


async def serve(config_path: str) -> None:
    from agent.config import load_config
    from drivers.s7.config import S7Device
    from drivers.s7.simulator import S7Simulator

    devices = [d for d in load_config(config_path).devices if isinstance(d, S7Device)]
    sim = S7Simulator(devices, update_interval_s=0.05)
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


def measure(measure_s: float, warmup_s: float) -> dict[str, Any]:
    from bench.harness import Child, Meter, cpu_seconds
    from drivers.s7.config import S7Device
    from drivers.s7.plan import plan_device
    from tests.support.broker import MosquittoBroker

    tmp = Path(tempfile.mkdtemp(prefix="bench-s7-"))
    broker = MosquittoBroker(
        extra_config=["max_inflight_messages 100", "max_queued_messages 0"],
        log_types=("error", "warning"),
    )
    children: list[Child] = []
    meter: Meter | None = None
    try:
        broker.start()
        write_config(tmp / "sim.yaml", 0, broker.port, tmp / "unused.db")
        sim = Child(
            "simulator", [sys.executable, "-m", "bench.s7_poll", "--serve", str(tmp / "sim.yaml")],
            tmp / "sim.log",
        ).start()  # fmt: skip
        children.append(sim)
        _, port = sim.json_line(60)["endpoints"]["cpu1"]
        write_config(tmp / "agent.yaml", port, broker.port, tmp / "buffer.db")
        meter = Meter(broker.host, broker.port, "bench/#").start()
        agent = Child(
            "agent", [sys.executable, "-m", "agent.cli", "run", str(tmp / "agent.yaml")],
            tmp / "agent.log",
        ).start()  # fmt: skip
        children.append(agent)
        if not meter.wait_values(1, 60):
            raise RuntimeError(f"no value within 60 s; {agent.tail()}")
        time.sleep(warmup_s)

        def requests() -> int:
            sim.signal(signal.SIGUSR1)
            return int(sim.json_line(10)["requests"]["cpu1"])

        r0, (v0, m0), c0, s0, t0 = (
            requests(), meter.snapshot(), cpu_seconds(agent.pid), cpu_seconds(sim.pid),
            time.monotonic(),
        )  # fmt: skip
        time.sleep(measure_s)
        r1, (v1, m1), c1, s1, t1 = (
            requests(), meter.snapshot(), cpu_seconds(agent.pid), cpu_seconds(sim.pid),
            time.monotonic(),
        )  # fmt: skip
        window, values, cpu = t1 - t0, v1 - v0, c1 - c0
        planned = len(plan_device(S7Device.model_validate(device(0))).groups["default"].requests)
        polls = (m1 - m0) or 1
        return {
            "scenario": "s7-poll",
            "description": "1 S7 CPU x 500 tags (200 REAL, 100 INT in DBs, 100 M bits, "
            "50 I bits, 50 Q words) @ 100 ms, PDU 480",
            "window_s": round(window, 1),
            "expected_per_s": TAGS / INTERVAL_S,
            "delivered_per_s": round(values / window, 1),
            "delivered_pct": round(100 * values / window / (TAGS / INTERVAL_S), 2),
            "agent_cpu_pct": round(100 * cpu / window, 1),
            "agent_cpu_s_per_million": round(cpu / values * 1e6, 2) if values else None,
            "simulator_cpu_pct": round(100 * (s1 - s0) / window, 1),
            "requests_per_poll": round((r1 - r0) / polls, 2),
            "requests_planned": planned,
            "bad_quality": meter.stats.bad,
            "agent_exit": agent.stop(30),
        }
    finally:
        if meter is not None:
            meter.close()
        for child in reversed(children):
            child.stop(30)
        broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="S7 bench scenario (500 tags @ 100 ms)")
    parser.add_argument("--serve", metavar="CONFIG", help="run the simulator process")
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="5 s window, 2 s warm-up")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    if args.quick:
        args.measure_s, args.warmup_s = 5.0, 2.0
    print(orjson.dumps(measure(args.measure_s, args.warmup_s)).decode(), flush=True)


if __name__ == "__main__":
    main()
