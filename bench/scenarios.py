"""The benchmark scenarios and the code that runs one: broker, simulator, agent, meter.

A run: start mosquitto (Receive Maximum 100, errors/warnings logged only), the simulator
process, the measuring subscriber, then the agent process; wait for the first value
(`first_value_s`, from spawning the agent), warm up, then measure for a fixed window:
values delivered, CPU of every process from /proc, and latency. Then SIGTERM the agent
and check completeness (unique seqs vs. the highest seq seen).

Latency figures (ms):
- `e2e`: Modbus — from the simulator writing the device's registers (the `clock` tag, see
  bench/sim_modbus.py; the simulator rewrites them at the first request of each poll) to
  the message's arrival at the subscriber; OPC UA — from the value's SourceTimestamp (the
  simulator's write) to arrival. One figure per message (one poll of one device).
- `agent`: from `ts_agent` (the agent's timestamp, taken after the poll's last response)
  to arrival: buffer, forwarder, broker and subscriber only.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from bench.harness import (
    Child,
    Meter,
    cpu_seconds,
    latency_ms,
    memory_kib,
)
from tests.support.broker import MosquittoBroker

Protocol = Literal["modbus", "opcua"]

# One block of 10 Modbus tags: (type, byte order, registers). 15 registers per 10 values.
_PATTERN: tuple[tuple[str, str, int], ...] = (
    ("int16", "ABCD", 1),
    ("float32", "ABCD", 2),
    ("int16", "BADC", 1),
    ("int32", "CDAB", 2),
    ("int16", "ABCD", 1),
    ("float32", "CDAB", 2),
    ("int16", "BADC", 1),
    ("float32", "DCBA", 2),
    ("int16", "ABCD", 1),
    ("int32", "BADC", 2),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    protocol: Protocol
    devices: int
    tags: int  # per device
    interval_s: float
    measure_s: float
    quick_measure_s: float
    warmup_s: float = 5.0
    opcua_mode: Literal["poll", "subscribe"] = "poll"
    outage_s: float = 0.0
    quick_outage_s: float = 0.0
    sim_processes: int = 1

    @property
    def expected_per_s(self) -> float:
        return self.devices * self.tags / self.interval_s


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("idle", "1 Modbus device x 100 tags @ 1 s", "modbus", 1, 100, 1.0, 60, 8),
        Scenario(
            "modbus-small", "10 Modbus devices x 100 tags @ 1 s", "modbus", 10, 100, 1.0, 60, 8
        ),
        Scenario(
            "modbus-wide",
            "10 Modbus devices x 1,000 tags (1,500 registers, int16/float32/int32, 4 byte "
            "orders) @ 100 ms",
            "modbus",
            10,
            1000,
            0.1,
            60,
            8,
            sim_processes=5,
        ),
        Scenario(
            "opcua-subscribe",
            "10,000 OPC UA monitored items changing at 1 Hz",
            "opcua",
            1,
            10_000,
            1.0,
            60,
            8,
            warmup_s=10.0,
            opcua_mode="subscribe",
        ),
        Scenario(
            "opcua-poll",
            "10,000 OPC UA nodes read @ 1 s",
            "opcua",
            1,
            10_000,
            1.0,
            60,
            8,
            warmup_s=10.0,
        ),
        Scenario(
            "outage-drain",
            "2 Modbus devices x 1,000 tags @ 100 ms (20,000 values/s); broker down 60 s",
            "modbus",
            2,
            1000,
            0.1,
            10,
            5,
            outage_s=60.0,
            quick_outage_s=8.0,
            sim_processes=2,
        ),
    )
}


@dataclass
class Options:
    quick: bool = False
    profile: bool = False
    uvloop: bool = False
    layout: str = "lean"  # the agent's mqtt.layout
    agent_args: list[str] = field(default_factory=list)
    out_dir: Path = field(default_factory=lambda: Path("bench/out"))
    measure_s: float | None = None  # overrides the scenario's window
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ configs


def modbus_tags(n: int) -> tuple[list[dict[str, Any]], int]:
    """Tag dicts for one device (the first is the uint32 clock) and the registers used."""
    tags: list[dict[str, Any]] = [{"name": "clock", "address": 0, "type": "uint32"}]
    address = 2
    for i in range(n - 1):
        kind, order, count = _PATTERN[i % len(_PATTERN)]
        tags.append({"name": f"t{i:04d}", "address": address, "type": kind, "byte_order": order})
        address += count
    return tags, address


def modbus_devices(s: Scenario, ports: dict[str, tuple[str, int]] | None) -> list[dict[str, Any]]:
    tags, _ = modbus_tags(s.tags)
    out = []
    for d in range(s.devices):
        name = f"plc{d:02d}"
        host, port = ports[name] if ports else ("127.0.0.1", 0)
        out.append(
            {
                "name": name,
                "protocol": "modbus",
                "host": host,
                "port": port,
                "interval_s": s.interval_s,
                "timeout_s": 1.0,
                "tags": tags,
            }
        )
    return out


def opcua_devices(s: Scenario, endpoints: dict[str, str] | None, pki: Path) -> list[dict[str, Any]]:
    out = []
    for d in range(s.devices):
        name = f"ua{d:02d}"
        dev: dict[str, Any] = {
            "name": name,
            "protocol": "opcua",
            "endpoint": endpoints[name] if endpoints else "opc.tcp://127.0.0.1:0/bench",
            "cert_dir": str(pki),
            "interval_s": s.interval_s,
            "timeout_s": 10.0,
            "mode": s.opcua_mode,
            "tags": [
                # Two keys only (a small file). The default type (Double) gets the
                # default generator, a 30 s sine, whose value changes at every refresh.
                {"name": f"v{i:05d}", "node_id": f"ns=2;s=Bench.V{i:05d}"}
                for i in range(s.tags)
            ],
        }
        if s.opcua_mode == "subscribe":
            dev["subscription"] = {
                "sampling_interval_ms": s.interval_s * 1000,
                "publishing_interval_ms": s.interval_s * 1000,
                "queue_size": 1,
            }
        out.append(dev)
    return out


def write_config(
    path: Path,
    devices: list[dict[str, Any]],
    buffer: Path,
    mqtt_port: int,
    layout: str = "lean",
) -> None:
    config = {
        "agent": {"id": "bench"},
        "buffer": {"path": str(buffer), "max_bytes": 4 << 30},
        "mqtt": {
            "host": "127.0.0.1",
            "port": mqtt_port,
            "topic": "bench/{device}",
            # Under the meter's bench/# (layout compact's metadata, which it decodes).
            "topic_meta": "bench/meta/{device}/{meta}",
            "layout": layout,
            "max_inflight": 100,
        },
        "logging": {"level": "info", "format": "json"},
        "devices": devices,
    }
    # JSON is YAML 1.2: no YAML writer needed, and nothing is reinterpreted.
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))


def min_requests(n: int) -> int:
    """The fewest 125-register reads that cover the device's tags without splitting a
    value across two requests (greedy packing is optimal for one contiguous run)."""
    count, used = 1, 0
    sizes = [2] + [_PATTERN[i % len(_PATTERN)][2] for i in range(n - 1)]
    for size in sizes:
        if used + size > 125:
            count, used = count + 1, 0
        used += size
    return count


# ------------------------------------------------------------------ measuring


@dataclass
class Mark:
    t: float
    cpu: dict[str, float]
    values: int
    messages: int
    requests: dict[str, int] | None = None


def mark(procs: dict[str, int], meter: Meter, sims: list[Child]) -> Mark:
    """Figures at one moment. `sims`: Modbus simulators, asked for their request counts."""
    requests: dict[str, int] | None = None
    for sim in sims:
        if sim.alive():
            sim.signal(signal.SIGUSR1)
            requests = {**(requests or {}), **sim.json_line(10).get("requests", {})}
    values, messages = meter.snapshot()
    cpu = {name: cpu_seconds(pid) for name, pid in procs.items()}
    cpu["simulator"] = sum(cpu.pop(n) for n in list(cpu) if n.startswith("simulator"))
    cpu["meter"] = time.process_time()
    return Mark(time.time(), cpu, values, messages, requests)


def profile_start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_profile(path: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) from py-spy's collapsed stacks, by self time."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (", 1)[0] + " " + _where(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return [(f, 100 * n / total, 100 * incl[f] / total) for f, n in ranked]


def _where(frame: str) -> str:
    if " (" not in frame:
        return ""
    loc = frame.split(" (", 1)[1].rstrip(")")
    path, _, _line = loc.rpartition(":")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"({path})"


# ------------------------------------------------------------------ one run


def run(s: Scenario, opt: Options) -> dict[str, Any]:
    measure_s = s.quick_measure_s if opt.quick else s.measure_s
    if opt.measure_s is not None:
        measure_s = opt.measure_s
    warmup_s = min(s.warmup_s, 3.0) if opt.quick else s.warmup_s
    outage_s = s.quick_outage_s if opt.quick else s.outage_s
    opt.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{s.name}-"))
    children: list[Child] = []
    broker = MosquittoBroker(
        extra_config=["max_inflight_messages 100", "max_queued_messages 0"],
        log_types=("error", "warning"),
        persistent=outage_s > 0,
        die_with_parent=True,
    )
    meter: Meter | None = None
    try:
        broker.start()
        sim_cfg = tmp / "sim.yaml"
        pki = tmp / "pki"
        sims: list[Child] = []
        endpoints: dict[str, Any] = {}
        if s.protocol == "modbus":
            # Real PLCs answer independently of each other; one simulator process for
            # many devices would serialise their requests and make the simulator the
            # bottleneck, so devices are spread over `sim_processes` processes.
            devices = modbus_devices(s, None)
            for n in range(s.sim_processes):
                part = tmp / f"sim{n}.yaml"
                write_config(part, devices[n :: s.sim_processes], tmp / "unused.db", broker.port)
                sim = Child(
                    f"simulator{n}",
                    [sys.executable, "-m", "bench.sim_modbus", str(part)],
                    tmp / f"sim{n}.log",
                ).start()
                children.append(sim)
                sims.append(sim)
            for sim in sims:
                endpoints.update(sim.json_line(120)["endpoints"])
        else:
            write_config(sim_cfg, opcua_devices(s, None, pki), tmp / "unused.db", broker.port)
            sim = Child(
                "simulator",
                [
                    sys.executable,
                    "-m",
                    "bench.sim_opcua",
                    str(sim_cfg),
                    "--update-interval-s",
                    str(s.interval_s),
                    "--cert-dir",
                    str(pki / "simulator"),
                ],
                tmp / "sim.log",
            ).start()
            children.append(sim)
            endpoints = sim.json_line(120)["endpoints"]
        cfg = tmp / "agent.yaml"
        devices = (
            modbus_devices(s, {k: (v[0], v[1]) for k, v in endpoints.items()})
            if s.protocol == "modbus"
            else opcua_devices(s, endpoints, pki)
        )
        write_config(cfg, devices, tmp / "buffer.db", broker.port, opt.layout)
        meter = Meter(broker.host, broker.port, "bench/#", session=outage_s > 0).start()
        experiments = opt.agent_args
        launcher = ["-m", "bench.agent_main", *experiments] if experiments else ["-m", "agent.cli"]
        # Explicit either way: `run` takes uvloop by itself when it is installed.
        loop = ["--event-loop", "uvloop" if opt.uvloop else "asyncio"]
        agent = Child(
            "agent", [sys.executable, *launcher, "run", str(cfg), *loop], tmp / "agent.log"
        )
        agent.start()
        children.append(agent)
        if not meter.wait_values(1, 90):
            raise RuntimeError(f"no value within 90 s; {agent.tail()}")
        first_value_s = meter.stats.arrivals[0].t - agent.started_at
        opt.log(f"{s.name}: first value after {first_value_s:.2f} s; warm-up {warmup_s:.0f} s")
        time.sleep(warmup_s)
        procs = {"agent": agent.pid}
        procs.update({c.name: c.pid for c in children if c.name.startswith("simulator")})
        if broker.pid is not None:
            procs["broker"] = broker.pid
        spy = None
        folded = opt.out_dir / f"{s.name}{'-uvloop' if opt.uvloop else ''}.folded"
        if opt.profile:
            spy = profile_start(agent.pid, measure_s, folded)
        a = mark(procs, meter, sims)
        opt.log(f"{s.name}: measuring {measure_s:.0f} s")
        time.sleep(measure_s)
        b = mark(procs, meter, sims)
        mem = memory_kib(agent.pid)
        drain: dict[str, Any] | None = None
        if outage_s > 0:
            drain = outage(s, broker, meter, outage_s, opt)
        if spy is not None:
            spy.wait(timeout=measure_s + 30)
        agent_exit = agent.stop(60)
        time.sleep(1.0)
        result = figures(s, opt, a, b, meter, mem, first_value_s, agent_exit, measure_s)
        if drain is not None:
            result["drain"] = drain
        if opt.profile and folded.exists():
            result["profile"] = [
                {"function": f, "self_pct": round(p, 1), "incl_pct": round(i, 1)}
                for f, p, i in summarize_profile(folded)
            ]
            result["profile_file"] = str(folded)
        return result
    finally:
        if meter is not None:
            meter.close()
        for child in reversed(children):
            child.stop(30)
            # Keep the logs of the last run of each scenario for a look afterwards.
            suffix = "-uvloop" if opt.uvloop else ""
            with contextlib.suppress(OSError):
                shutil.copy(child.log_path, opt.out_dir / f"{s.name}{suffix}-{child.name}.log")
        broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


def outage(
    s: Scenario, broker: MosquittoBroker, meter: Meter, outage_s: float, opt: Options
) -> dict[str, Any]:
    """Stop the broker for outage_s, restart it, and time how long the backlog takes to
    arrive: the catch-up moment is the first message after the restart that is less than
    1 s old (the forwarder sends oldest first, so everything older arrived before it)."""
    opt.log(f"{s.name}: broker down for {outage_s:.0f} s")
    broker.stop()
    t_down = time.time()
    time.sleep(outage_s)
    broker.start()
    t_back = time.time()
    opt.log(f"{s.name}: broker back; draining")
    deadline = time.monotonic() + (30.0 if opt.quick else max(120.0, outage_s * 4))
    caught: float | None = None
    seen = 0
    while time.monotonic() < deadline and caught is None:
        time.sleep(0.2)
        with meter._lock:
            new = meter.stats.arrivals[seen:]
        seen += len(new)
        for arr in new:
            if arr.t > t_back and arr.t - arr.ts_agent < 1.0:
                caught = arr.t
                break
    if caught is None:
        return {"outage_s": outage_s, "caught_up": False}
    with meter._lock:
        drained = sum(x.values for x in meter.stats.arrivals if t_back <= x.t <= caught)
    drain_s = caught - t_back
    rate = drained / drain_s if drain_s > 0 else math.inf
    time.sleep(2.0)
    return {
        "outage_s": round(t_back - t_down, 1),
        "caught_up": True,
        "drain_s": round(drain_s, 2),
        "values_during_drain": drained,
        "drain_rate_per_s": round(rate),
        "x_production": round(rate / s.expected_per_s, 1),
    }


def figures(
    s: Scenario,
    opt: Options,
    a: Mark,
    b: Mark,
    meter: Meter,
    mem: dict[str, int],
    first_value_s: float,
    agent_exit: int | None,
    measure_s: float,
) -> dict[str, Any]:
    window = b.t - a.t
    values = b.values - a.values
    cpu = {k: b.cpu[k] - a.cpu[k] for k in a.cpu}
    with meter._lock:
        arrivals = [x for x in meter.stats.arrivals if a.t <= x.t < b.t]
        st = meter.stats
        total, dups, bad, max_seq = st.values, st.duplicates, st.bad, st.max_seq
    unique = meter.unique_seqs()
    e2e = [x.e2e_s for x in arrivals if x.e2e_s is not None]
    agent_lat = [x.t - x.ts_agent for x in arrivals]
    rate = values / window
    result: dict[str, Any] = {
        "scenario": s.name,
        "quick": opt.quick,
        "uvloop": opt.uvloop,
        "layout": opt.layout,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "window_s": round(window, 1),
        "expected_per_s": s.expected_per_s,
        "delivered_per_s": round(rate, 1),
        "delivered_pct": round(100 * rate / s.expected_per_s, 2),
        "messages_per_s": round((b.messages - a.messages) / window, 1),
        "agent_cpu_pct": round(100 * cpu["agent"] / window, 1),
        "agent_cpu_s_per_million": round(cpu["agent"] / values * 1e6, 2) if values else None,
        "simulator_cpu_pct": round(100 * cpu["simulator"] / window, 1),
        "broker_cpu_pct": round(100 * cpu.get("broker", 0.0) / window, 1),
        "meter_cpu_pct": round(100 * cpu["meter"] / window, 1),
        "agent_rss_peak_mb": round(mem.get("VmHWM", 0) / 1024, 1),
        "agent_rss_mb": round(mem.get("VmRSS", 0) / 1024, 1),
        "latency_e2e_ms": latency_ms(e2e),
        "latency_agent_ms": latency_ms(agent_lat),
        "first_value_s": round(first_value_s, 2),
        "values_total": total,
        "unique_seqs": unique,
        "max_seq": max_seq,
        "missing": max(0, max_seq - unique),
        "duplicates": dups,
        "bad_quality": bad,
        "agent_exit": agent_exit,
    }
    if s.protocol == "modbus" and a.requests and b.requests:
        from drivers.modbus.config import ModbusDevice
        from drivers.modbus.plan import plan_device

        dev = ModbusDevice.model_validate(modbus_devices(s, None)[0])
        planned = sum(len(g.requests) for g in plan_device(dev).groups.values())
        requests = sum(b.requests.values()) - sum(a.requests.values())
        polls = (b.messages - a.messages) or 1
        result["requests_per_poll"] = round(requests / polls, 2)
        result["requests_planned"] = planned
        result["requests_minimum"] = min_requests(s.tags)
    return result
