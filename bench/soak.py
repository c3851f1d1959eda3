"""Soak: steady polling of several simulated PLCs through broker outages, agent SIGKILLs
and PLC restarts; prints what was produced, delivered, lost and duplicated.

    .venv/bin/python bench/soak.py                 # 3 minutes, 3 outages, 2 kills, 2 restarts
    .venv/bin/python bench/soak.py --minutes 10 --outages 5 --kills 3 --plc-restarts 3
    .venv/bin/python bench/soak.py --quick         # <= 60 s, what CI runs

Run from the repository root. Everything is real and on 127.0.0.1: mosquitto with
persistence (sessions survive its restarts), `edge-agent simulate` for the PLCs (its own
process, so it can be restarted on the same ports), `edge-agent run` for the agent, and a
subscriber with a persistent session (client id + session expiry) started first, so the
broker keeps queueing for it while it is down.

Figures (in samples; a sample is one value with its own seq):
- produced: the agent's seq high-water at the end (read from its buffer file);
- delivered: distinct seqs received; duplicated: received minus distinct;
- lost: seqs in 1..produced neither received, nor still buffered, nor reported as a gap
  (a gap is a *reported* loss: the buffer's policy dropped them and said so);
- max backlog: the most samples produced but not yet received at any moment (from each
  sample's ts_agent and the time the subscriber received it);
- RSS of the agent process: after its first start, at the end, and the highest seen.
The last line of stdout is one JSON object with all figures; `--json-only` prints only it.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.broker import MosquittoBroker, free_port  # noqa: E402
from tests.support.subscriber import Received, Subscriber  # noqa: E402


def write_config(directory: Path, broker_port: int, ports: list[int], interval_s: float) -> Path:
    devices = []
    for i, port in enumerate(ports):
        devices.append(
            f"""\
  - name: plc{i}
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    interval_s: {interval_s}
    timeout_s: 0.5
    tags:
      - {{ name: counter, address: 0, type: uint32,
          simulate: {{ generator: counter, step: 1, period_s: 0.1 }} }}
      - {{ name: power_kw, address: 2, type: float32, unit: kW,
          simulate: {{ generator: sine, min: 20, max: 80, period_s: 20 }} }}
      - {{ name: temp, address: 4, type: int16, scale: 0.1, unit: degC,
          simulate: {{ generator: random_walk, min: 180, max: 220, step: 1 }} }}
      - {{ name: running, table: coil, address: 0, type: bool,
          simulate: {{ generator: toggle, period_s: 7, value: true }} }}
"""
        )
    path = directory / "soak.yaml"
    path.write_text(
        f"""\
agent:
  id: gw-soak
  site: soak
mqtt:
  host: 127.0.0.1
  port: {broker_port}
  reconnect_min_s: 0.2
  reconnect_max_s: 1
buffer:
  path: {directory / "buffer.db"}
  max_bytes: 268435456
logging:
  level: info
  format: json
devices:
{"".join(devices)}"""
    )
    return path


class Proc:
    """`edge-agent <args>` as a child process, stderr appended to a log file."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", *self.args],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def rss_kib(self) -> int | None:
        pid = self.pid
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@dataclass
class Timeline:
    """(monotonic time, messages received so far), sampled every second."""

    points: list[tuple[float, int]] = field(default_factory=list)
    restarts: list[tuple[str, float, int]] = field(default_factory=list)  # what, when, msgs


def plan_events(
    duration_s: float, outages: int, kills: int, restarts: int
) -> list[tuple[float, str]]:
    """Spread the fault events over the middle 80 % of the run, in a shuffled order."""
    kinds = ["outage"] * outages + ["kill"] * kills + ["plc"] * restarts
    random.Random(7).shuffle(kinds)
    if not kinds:
        return []
    start, end = 0.1 * duration_s, 0.85 * duration_s
    step = (end - start) / len(kinds)
    return [(start + i * step, kind) for i, kind in enumerate(kinds)]


def first_message_after(sub: Subscriber, count: int, timeout_s: float) -> float | None:
    t0 = time.monotonic()
    try:
        sub.wait_count(count + 1, timeout_s)
    except TimeoutError:
        return None
    return time.monotonic() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration_s = args.minutes * 60.0
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        directory = Path(tmp)
        ports = [free_port() for _ in range(args.devices)]
        broker = MosquittoBroker(persistent=True).start()
        sub: Subscriber | None = None
        agent: Proc | None = None
        plc: Proc | None = None
        try:
            config = write_config(directory, broker.port, ports, args.interval_s)
            sub = Subscriber(
                broker.host, broker.port, "#", client_id="soak-sub", session_expiry_s=3600
            ).start()
            plc = Proc(directory / "plc.log", "simulate", str(config))
            plc.start()
            time.sleep(2.0)  # let the simulators bind before the agent's first poll
            agent = Proc(directory / "agent.log", "run", str(config), "--grace-s", "30")
            agent.start()
            t_start = time.monotonic()
            timeline = Timeline()
            rss_first: int | None = None
            rss_max = 0
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    timeline.points.append((time.time(), len(sub.messages())))

            sampler = threading.Thread(target=sample, name="sampler", daemon=True)
            sampler.start()
            events = plan_events(duration_s, args.outages, args.kills, args.plc_restarts)
            done_events: list[dict[str, Any]] = []
            while (now := time.monotonic() - t_start) < duration_s:
                rss = agent.rss_kib()
                if rss is not None:
                    rss_max = max(rss_max, rss)
                    if rss_first is None and now > 5:
                        rss_first = rss
                if events and now >= events[0][0]:
                    _, kind = events.pop(0)
                    done_events.append(fault(kind, broker, agent, plc, sub, args))
                    continue
                time.sleep(0.5)
            rss_end = agent.rss_kib()
            # Production ends; the agent gets `--grace-s` to deliver what is buffered.
            code = agent.terminate(timeout_s=60)
            stop.set()
            sampler.join()
            plc.terminate(timeout_s=10)
            produced, buffered, gap_seqs = read_buffer(directory / "buffer.db")
            time.sleep(2.0)  # the last PUBACKed messages reach the subscriber
            messages = sub.messages()
            return figures(
                args,
                messages,
                timeline,
                produced=produced,
                buffered=buffered,
                gap_seqs=gap_seqs,
                events=done_events,
                rss=(rss_first, rss_end, rss_max),
                agent_exit=code,
                elapsed_s=time.monotonic() - t_start,
            )
        finally:
            for proc in (agent, plc):
                if proc is not None:
                    proc.kill()
            if sub is not None:
                sub.close()
            broker.close()
            if args.keep_logs:
                for name in ("agent.log", "plc.log"):
                    src = directory / name
                    if src.exists():
                        (Path(args.keep_logs) / name).write_bytes(src.read_bytes())


def fault(
    kind: str,
    broker: MosquittoBroker,
    agent: Proc,
    plc: Proc,
    sub: Subscriber,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Inject one fault and wait until it is over; returns what happened."""
    t0 = time.monotonic()
    if kind == "outage":
        broker.stop()  # SIGTERM: mosquitto saves its sessions (persistence on)
        time.sleep(args.outage_s)
        broker.start()
        sub.wait_subscribed(30)
        return {"event": "broker_outage", "down_s": round(time.monotonic() - t0, 1)}
    if kind == "kill":
        agent.kill()
        time.sleep(1.0)
        count = len(sub.messages())
        agent.start()
        # From restart to the first message the new process published (measured, not asserted).
        resumed = first_message_after(sub, count, 30.0)
        return {
            "event": "agent_sigkill",
            "resume_s": None if resumed is None else round(resumed, 2),
        }
    plc.terminate(timeout_s=10)
    time.sleep(args.plc_down_s)
    plc.start()
    return {"event": "plc_restart", "down_s": round(time.monotonic() - t0, 1)}


def read_buffer(path: Path) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    """(seq high-water, seq ranges still buffered, gap ranges) of a closed buffer file."""
    con = sqlite3.connect(path)
    try:
        high = int(con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
        buffered = [
            (int(a), int(b)) for a, b in con.execute("SELECT first_seq, last_seq FROM records")
        ]
        gaps = [(int(a), int(b)) for a, b in con.execute("SELECT first_seq, last_seq FROM gaps")]
    finally:
        con.close()
    seq_file = Path(f"{path}.seq")
    if seq_file.exists():
        text = seq_file.read_bytes().strip(b"\0 \n")
        high = max(high, int(text) if text else 0)
    return high, buffered, gaps


def figures(
    args: argparse.Namespace,
    messages: list[Received],
    timeline: Timeline,
    *,
    produced: int,
    buffered: list[tuple[int, int]],
    gap_seqs: list[tuple[int, int]],
    events: list[dict[str, Any]],
    rss: tuple[int | None, int | None, int],
    agent_exit: int | None,
    elapsed_s: float,
) -> dict[str, Any]:
    received = 0
    seen: dict[int, tuple[str, str, str]] = {}
    conflicts = 0
    first_index: dict[int, int] = {}  # seq -> index of the message that first carried it
    produced_at: dict[int, float] = {}
    for index, message in enumerate(messages):
        body = orjson.loads(message.payload)
        if not isinstance(body, dict) or "samples" not in body:
            continue
        for s in body["samples"]:
            received += 1
            seq = int(s["seq"])
            ident = (str(s["device"]), str(s["tag"]), str(s["ts_agent"]))
            if seq in seen:
                conflicts += seen[seq] != ident  # the same seq for a different sample
                continue
            seen[seq] = ident
            first_index[seq] = index
            produced_at[seq] = datetime.fromisoformat(str(s["ts_agent"])).timestamp()
    still = {q for a, b in buffered for q in range(a, b + 1)}
    gapped = {q for a, b in gap_seqs for q in range(a, b + 1)}
    missing = [q for q in range(1, produced + 1) if q not in seen and q not in still]
    lost = [q for q in missing if q not in gapped]
    # Backlog at each sampled moment: produced by then (by ts_agent) minus received by then.
    by_time = sorted(produced_at.values())
    max_backlog = 0

    msg_first_seqs: list[int] = [0] * (len(messages) + 1)
    for index in first_index.values():
        msg_first_seqs[index + 1] += 1
    cumulative = [0]
    for n in msg_first_seqs[1:]:
        cumulative.append(cumulative[-1] + n)
    for wall, count in timeline.points:
        made = bisect.bisect_right(by_time, wall)
        got = cumulative[min(count, len(messages))]
        max_backlog = max(max_backlog, made - got)
    resumes = [e["resume_s"] for e in events if e["event"] == "agent_sigkill"]
    return {
        "bench": "soak",
        "minutes": args.minutes,
        "elapsed_s": round(elapsed_s, 1),
        "devices": args.devices,
        "interval_s": args.interval_s,
        "broker_outages": sum(e["event"] == "broker_outage" for e in events),
        "agent_sigkills": sum(e["event"] == "agent_sigkill" for e in events),
        "plc_restarts": sum(e["event"] == "plc_restart" for e in events),
        "produced": produced,
        "delivered": len(seen),
        "received": received,
        "duplicated": received - len(seen),
        "seq_conflicts": conflicts,
        "still_buffered": len(still),
        "reported_gaps": len(gapped & set(missing)),
        "lost": len(lost),
        "lost_first": lost[:10],
        "max_backlog": max_backlog,
        "resume_after_kill_s": resumes,
        "rss_kib_start": rss[0],
        "rss_kib_end": rss[1],
        "rss_kib_max": rss[2],
        "agent_exit": agent_exit,
        "events": events,
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        (
            "run",
            f"{result['elapsed_s']} s, {result['devices']} devices every {result['interval_s']} s",
        ),
        (
            "faults",
            f"{result['broker_outages']} broker outages, {result['agent_sigkills']} agent "
            f"SIGKILLs, {result['plc_restarts']} PLC restarts",
        ),
        ("produced", result["produced"]),
        ("delivered", result["delivered"]),
        ("lost", result["lost"]),
        ("duplicated", result["duplicated"]),
        ("seq conflicts", result["seq_conflicts"]),
        ("still buffered", result["still_buffered"]),
        ("reported gaps", result["reported_gaps"]),
        ("max backlog", result["max_backlog"]),
        ("resume after kill (s)", result["resume_after_kill_s"]),
        (
            "agent RSS (KiB)",
            f"start {result['rss_kib_start']}, end {result['rss_kib_end']}, "
            f"max {result['rss_kib_max']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--outages", type=int, default=3)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--plc-restarts", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--interval-s", type=float, default=0.1)
    parser.add_argument("--outage-s", type=float, default=5.0)
    parser.add_argument("--plc-down-s", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="<= 60 s: 1 of each fault")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the agent/PLC logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.outages, args.kills, args.plc_restarts = 0.6, 1, 1, 1
        args.outage_s, args.plc_down_s = 3.0, 2.0
    result = run(args)
    if not args.json_only:
        print(table(result))
    print(orjson.dumps(result).decode())
    return 0 if result["lost"] == 0 and result["seq_conflicts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
