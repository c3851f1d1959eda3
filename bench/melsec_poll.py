"""MELSEC bench: one FX5U-like device, 500 tags over D, W, M, X and TN, polled every 100 ms.

    python -m bench.melsec_poll [--measure-s 20] [--clients]

Runs each part in its own process, as in production: mosquitto, the MELSEC simulator
(`python -m bench.melsec_poll --serve CONFIG`) and the agent (`python -m agent.cli run`).
Prints one JSON object: values/s received by a subscriber, agent CPU seconds per million
values, requests per poll counted by the simulator, bad values.

`--clients` also measures the client side of one 500-tag poll for three clients against
the same simulator process (the measurement behind "our own codec" in
drivers/melsec/README.md): our driver, aslmp's async client and pymcprotocol, each making
the same two reads the plan makes (one 250-word batch read, one random read of 66 words +
100 double words), as client CPU time per poll and wall time per poll.
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

from bench.harness import Child, Meter, cpu_seconds, machine
from tests.support.broker import MosquittoBroker

TAGS = 500


def tags() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    out += [{"name": f"d{i}", "address": f"D{i}"} for i in range(250)]
    out += [{"name": f"f{i}", "address": f"D{2000 + 2 * i}", "type": "float32"} for i in range(100)]
    out += [{"name": f"w{i}", "address": f"W{i:X}", "scale": 0.5} for i in range(50)]
    out += [{"name": f"m{i}", "address": f"M{100 + i}"} for i in range(60)]
    out += [{"name": f"x{i}", "address": f"X{i:o}"} for i in range(30)]
    out += [{"name": f"tn{i}", "address": f"TN{i}"} for i in range(10)]
    assert len(out) == TAGS
    return out


def device(port: int, interval_s: float) -> dict[str, Any]:
    return {
        "name": "fx5u",
        "protocol": "melsec",
        "series": "iq-f",
        "host": "127.0.0.1",
        "port": port,
        "interval_s": interval_s,
        "timeout_s": 1.0,
        "tags": tags(),
    }


def write_config(path: Path, dev: dict[str, Any], buffer: Path, mqtt_port: int) -> None:
    config = {
        "agent": {"id": "bench"},
        "buffer": {"path": str(buffer), "max_bytes": 4 << 30},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "topic": "bench/{device}"},
        "logging": {"level": "info", "format": "json"},
        "devices": [dev],
    }
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))


# ------------------------------------------------------------------ simulator process


async def serve(config_path: str) -> None:
    from agent.config import load_config
    from drivers.melsec.config import MelsecDevice
    from drivers.melsec.simulator import MelsecSimulator

    devices = [d for d in load_config(config_path).devices if isinstance(d, MelsecDevice)]
    sim = MelsecSimulator(devices, update_interval_s=0.05)
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


# ------------------------------------------------------------------ client comparison


async def compare_clients(host: str, port: int, polls: int) -> dict[str, Any]:
    from drivers.melsec.config import MelsecDevice
    from drivers.melsec.driver import MelsecDriver

    results: dict[str, Any] = {}
    dev = MelsecDevice.model_validate(device(port, 0.1))
    driver = MelsecDriver(dev)
    await driver.connect()
    await driver.read_columns("default")
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(polls):
        await driver.read_columns("default")
    results["ours"] = _figures(polls, c0, t0)
    await driver.close()

    from drivers.melsec.config import Address
    from drivers.melsec.plan import plan_device

    batch, rnd = plan_device(dev).groups["default"].requests
    assert batch.kind is not None
    head, count = Address(batch.kind, batch.start), batch.count
    try:
        import aslmp
        from aslmp.client import Handshake
        from aslmp.commands.random import dword, word
    except ImportError:
        results["aslmp"] = "not installed"
    else:
        points = [
            word(Address(k, n).text("iq-f"), kind="bits" if k.is_bit else "u16")
            for n, k in rnd.word_points
        ]
        points += [dword(Address(k, n).text("iq-f"), kind="f32") for n, k in rnd.dword_points]
        async with aslmp.Plc(
            host, port, profile="melsec:iq-f/fx5u", handshake=Handshake.NONE
        ) as plc:

            async def poll() -> None:
                await plc.read_words(head.text("iq-f"), count)
                await plc.read_random(points)

            await poll()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(polls):
                await poll()
            results["aslmp"] = _figures(polls, c0, t0)

    try:
        import pymcprotocol
    except ImportError:
        results["pymcprotocol"] = "not installed"
    else:
        # pymcprotocol writes X in hexadecimal (Q notation): the same device numbers.
        # and wants a 0 after the name of a hexadecimal device ("WA" → "W0A").
        def text(k: Any, n: int) -> str:
            return f"{k.name}0{n:X}" if k.radix == 16 else Address(k, n).text("q")

        words = [text(k, n) for n, k in rnd.word_points]
        dwords = [text(k, n) for n, k in rnd.dword_points]

        def pymc() -> dict[str, float]:
            client = pymcprotocol.Type3E(plctype="Q")
            client.connect(host, port)
            client.batchread_wordunits(head.text("q"), count)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(polls):
                client.batchread_wordunits(head.text("q"), count)
                client.randomread(words, dwords)
            out = _figures(polls, c0, t0)
            client.close()
            return out

        results["pymcprotocol"] = await asyncio.to_thread(pymc)
    return results


def _figures(polls: int, c0: float, t0: float) -> dict[str, float]:
    cpu = time.process_time() - c0
    wall = time.perf_counter() - t0
    return {
        "client_cpu_us_per_poll": round(1e6 * cpu / polls, 1),
        "wall_ms_per_poll": round(1e3 * wall / polls, 3),
        "client_cpu_us_per_value": round(1e6 * cpu / polls / TAGS, 2),
    }


# ------------------------------------------------------------------ the scenario


def run(measure_s: float, warmup_s: float, clients: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-melsec-"))
    broker = MosquittoBroker(extra_config=["max_inflight_messages 100", "max_queued_messages 0"])
    children: list[Child] = []
    meter: Meter | None = None
    try:
        broker.start()
        sim_cfg = tmp / "sim.yaml"
        write_config(sim_cfg, device(0, 0.1), tmp / "unused.db", broker.port)
        sim = Child(
            "simulator", [sys.executable, "-m", "bench.melsec_poll", "--serve", str(sim_cfg)],
            tmp / "sim.log",
        ).start()  # fmt: skip
        children.append(sim)
        host, port = sim.json_line(120)["endpoints"]["fx5u"]
        result: dict[str, Any] = {"scenario": "melsec: 1 iQ-F device x 500 tags @ 100 ms"}
        result["machine"] = machine()
        if clients:
            result["clients"] = asyncio.run(compare_clients(host, port, 500))
        cfg = tmp / "agent.yaml"
        write_config(cfg, device(port, 0.1), tmp / "buffer.db", broker.port)
        meter = Meter(broker.host, broker.port, "bench/#").start()
        agent = Child("agent", [sys.executable, "-m", "agent.cli", "run", str(cfg)], tmp / "a.log")
        agent.start()
        children.append(agent)
        if not meter.wait_values(1, 90):
            raise RuntimeError(f"no value within 90 s; {agent.tail()}")
        time.sleep(warmup_s)
        sim.signal(signal.SIGUSR1)
        req0 = sim.json_line(10)["requests"]["fx5u"]
        v0, m0 = meter.snapshot()
        bad0 = meter.stats.bad
        a0, s0, t0 = cpu_seconds(agent.pid), cpu_seconds(sim.pid), time.monotonic()
        time.sleep(measure_s)
        a1, s1, t1 = cpu_seconds(agent.pid), cpu_seconds(sim.pid), time.monotonic()
        v1, m1 = meter.snapshot()
        sim.signal(signal.SIGUSR1)
        req1 = sim.json_line(10)["requests"]["fx5u"]
        values = v1 - v0
        polls = values / TAGS
        elapsed = t1 - t0
        result.update(
            {
                "measure_s": round(elapsed, 1),
                "values_per_s": round(values / elapsed),
                "polls_per_s": round(polls / elapsed, 2),
                "requests_per_poll": round((req1 - req0) / polls, 2) if polls else None,
                "messages_per_s": round((m1 - m0) / elapsed, 1),
                "agent_cpu_s_per_million_values": round((a1 - a0) / values * 1e6, 1)
                if values
                else None,
                "agent_cpu_pct": round(100 * (a1 - a0) / elapsed, 1),
                "simulator_cpu_pct": round(100 * (s1 - s0) / elapsed, 1),
                "bad_values": meter.stats.bad - bad0,
            }
        )
        return result
    finally:
        if meter is not None:
            meter.close()
        for child in reversed(children):
            child.stop(30)
        broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="MELSEC bench: 500 tags at 100 ms")
    parser.add_argument("--serve", metavar="CONFIG", help="run as the simulator process")
    parser.add_argument("--measure-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--clients", action="store_true", help="also compare SLMP clients")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    result = run(args.measure_s, args.warmup_s, args.clients)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
