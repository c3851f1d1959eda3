"""Soak: steady polling of several simulated PLCs through broker outages, agent SIGKILLs
and PLC restarts; prints what was produced, delivered, lost and duplicated.

    .venv/bin/python bench/soak.py                 # 3 minutes, 3 outages, 2 kills, 2 restarts
    .venv/bin/python bench/soak.py --minutes 10 --outages 5 --kills 3 --plc-restarts 3
    .venv/bin/python bench/soak.py --quick         # <= 60 s, what CI runs
    .venv/bin/python bench/soak.py --no-poison     # only the healthy devices

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

Poison events (on unless `--no-poison`): beside the healthy devices `plc0..` the agent also
polls `denied`, whose topic the broker's ACL refuses (PUBACK 0x87: dead-lettered and
announced as a gap), `big`, one poll of which is larger than the broker's maximum packet
size (16 KiB: split into several messages), and `nan`, whose float32 reads NaN (published
as bad quality, never null/good); and once, during a broker outage, the buffer file is
damaged on disk (salvaged, the loss reported as a gap). The figures then say, per device,
the samples and polls delivered and the polls per second, and count each poison where the
docs say it is counted: dead-letter and corrupt gaps from the gap notices on the wire, NaN
samples by quality, the largest message against the broker's limit.
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

from agent.layouts.decode import DecodeError, Decoder  # noqa: E402
from tests.support.broker import MosquittoBroker, free_port  # noqa: E402
from tests.support.subscriber import Received, Subscriber  # noqa: E402

#: The broker's maximum packet size in the poison run (mosquitto `max_packet_size`).
POISON_MAX_PACKET = 16384
#: Poison devices: name -> what makes them poison (their simulators follow the healthy ones).
POISON_DEVICES = ("denied", "big", "nan")
BIG_TAGS = 300


def healthy_tags() -> str:
    return """\
    tags:
      - { name: counter, address: 0, type: uint32,
          simulate: { generator: counter, step: 1, period_s: 0.1 } }
      - { name: power_kw, address: 2, type: float32, unit: kW,
          simulate: { generator: sine, min: 20, max: 80, period_s: 20 } }
      - { name: temp, address: 4, type: int16, scale: 0.1, unit: degC,
          simulate: { generator: random_walk, min: 180, max: 220, step: 1 } }
      - { name: running, table: coil, address: 0, type: bool,
          simulate: { generator: toggle, period_s: 7, value: true } }
"""


def poison_devices(ports: list[int], interval_s: float) -> str:
    denied, big, nan = ports
    big_tags = "".join(
        f"      - {{ name: v{i:03d}, address: {2 * i}, type: float32,"
        f" simulate: {{ generator: sine, min: 0, max: 100, period_s: {10 + i % 7} }} }}\n"
        for i in range(BIG_TAGS)
    )
    return f"""\
  - name: denied
    protocol: modbus
    host: 127.0.0.1
    port: {denied}
    interval_s: {interval_s}
    timeout_s: 0.5
{healthy_tags()}\
  - name: big
    protocol: modbus
    host: 127.0.0.1
    port: {big}
    interval_s: 1.0
    timeout_s: 0.5
    tags:
{big_tags}\
  - name: nan
    protocol: modbus
    host: 127.0.0.1
    port: {nan}
    interval_s: {interval_s}
    timeout_s: 0.5
    tags:
      - {{ name: bad_float, address: 0, type: float32,
          simulate: {{ generator: constant, value: .nan }} }}
      - {{ name: count, address: 2, type: uint16,
          simulate: {{ generator: counter, step: 1, period_s: 0.1 }} }}
"""


def poison_acl(devices: int) -> str:
    """Every topic the agent publishes to, but the `denied` device's."""
    allowed = [f"edge/gw-soak/plc{i}" for i in range(devices)] + [
        "edge/gw-soak/big",
        "edge/gw-soak/nan",
        "edge-status/#",
    ]
    return "".join(f"topic readwrite {t}\n" for t in allowed) + "topic read #\n"


def write_config(
    directory: Path,
    broker_port: int,
    ports: list[int],
    interval_s: float,
    poison_ports: list[int] | None = None,
) -> Path:
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
{healthy_tags()}"""
        )
    if poison_ports:
        devices.append(poison_devices(poison_ports, interval_s))
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
    duration_s: float, outages: int, kills: int, restarts: int, damages: int = 0
) -> list[tuple[float, str]]:
    """Spread the fault events over the middle 80 % of the run, in a shuffled order."""
    kinds = ["outage"] * outages + ["kill"] * kills + ["plc"] * restarts + ["damage"] * damages
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
        poison_ports = [free_port() for _ in POISON_DEVICES] if args.poison else None
        broker = MosquittoBroker(
            persistent=True,
            acl=poison_acl(args.devices) if args.poison else None,
            # The measuring subscriber is offline for a moment after each broker restart:
            # mosquitto's default queue of 1,000 messages for it would drop the backlog the
            # agent drains meanwhile (acknowledged to the agent, lost to the measurement).
            extra_config=[
                "max_queued_messages 100000",
                *([f"max_packet_size {POISON_MAX_PACKET}"] if args.poison else []),
            ],
            # --keep-logs: every packet, to trace a lost seq through the broker.
            log_types=("all",) if args.keep_logs else ("error", "warning"),
        ).start()
        sub: Subscriber | None = None
        agent: Proc | None = None
        plc: Proc | None = None
        try:
            config = write_config(directory, broker.port, ports, args.interval_s, poison_ports)
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
            events = plan_events(
                duration_s,
                args.outages,
                args.kills,
                args.plc_restarts,
                args.damages if args.poison else 0,
            )
            done_events: list[dict[str, Any]] = []
            while (now := time.monotonic() - t_start) < duration_s:
                rss = agent.rss_kib()
                if rss is not None:
                    rss_max = max(rss_max, rss)
                    if rss_first is None and now > 5:
                        rss_first = rss
                if events and now >= events[0][0]:
                    _, kind = events.pop(0)
                    at = round(time.time(), 2)
                    done_events.append(
                        {
                            **fault(kind, broker, agent, plc, sub, args, directory / "buffer.db"),
                            "at": at,
                        }
                    )
                    continue
                time.sleep(0.5)
            rss_end = agent.rss_kib()
            # Production ends; the agent gets `--grace-s` to deliver what is buffered.
            code = agent.terminate(timeout_s=60)
            stop.set()
            sampler.join()
            plc.terminate(timeout_s=10)
            produced, buffered, gap_seqs = read_buffer(directory / "buffer.db")
            dead_letters = read_dead_letters(directory / "buffer.db.deadletter.sqlite")
            time.sleep(2.0)  # the last PUBACKed messages reach the subscriber
            messages = sub.messages()
            return figures(
                args,
                messages,
                timeline,
                produced=produced,
                buffered=buffered,
                gap_seqs=gap_seqs,
                dead_letters=dead_letters,
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
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for src in (directory / "agent.log", directory / "plc.log", broker.log_path):
                    if src.exists():
                        (Path(args.keep_logs) / src.name).write_bytes(src.read_bytes())
            broker.close()


def fault(
    kind: str,
    broker: MosquittoBroker,
    agent: Proc,
    plc: Proc,
    sub: Subscriber,
    args: argparse.Namespace,
    buffer_path: Path,
) -> dict[str, Any]:
    """Inject one fault and wait until it is over; returns what happened."""
    t0 = time.monotonic()
    if kind == "damage":
        # During an outage, so the file holds a backlog the agent has still to read.
        broker.stop()
        time.sleep(args.outage_s / 2)
        damaged = damage_file(buffer_path)
        time.sleep(args.outage_s / 2)
        restart_subscriber_first(broker, sub)
        return {
            "event": "buffer_damaged",
            "bytes_overwritten": damaged,
            "down_s": round(time.monotonic() - t0, 1),
        }
    if kind == "outage":
        broker.stop()  # SIGTERM: mosquitto saves its sessions (persistence on)
        time.sleep(args.outage_s)
        restart_subscriber_first(broker, sub)
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


def restart_subscriber_first(broker: MosquittoBroker, sub: Subscriber) -> None:
    """Start the broker again, letting the measuring subscriber back in before the agent.

    mosquitto 2.0.11 with persistence and an ACL file (the poison run's) restores a
    persistent session at start but queues nothing for it until its client reconnects:
    what the agent publishes in between is acknowledged to the agent (PUBACK 0) and never
    reaches the subscriber — a loss of the measurement, not of the agent
    (tests/integration/test_broker_sessions.py, docs/library-notes.md). So the broker
    first admits only the subscriber's client id (`clientid_prefixes`, reloaded on
    SIGHUP) and opens to every client once the subscriber has subscribed again; the
    agent's connection attempts in between are refused and retried."""
    normal = list(broker.extra_config)
    broker.reconfigure([*normal, f"clientid_prefixes {sub.client_id}"])
    broker.start()
    try:
        sub.wait_subscribed(30)
    finally:
        broker.reconfigure(normal)


def damage_file(path: Path, pages: int = 4, page: int = 4096) -> int:
    """Overwrite `pages` pages in the middle of the buffer file and of its WAL with noise,
    as a bad sector would; the header page stays. Returns the bytes overwritten."""
    rng = random.Random(11)
    done = 0
    for target in (path, Path(f"{path}-wal")):
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            continue
        if size < 3 * page:
            continue
        start = max(page, (size // 2) // page * page)
        with target.open("r+b") as f:
            f.seek(start)
            length = min(pages * page, size - start)
            f.write(bytes(rng.getrandbits(8) for _ in range(length)))
            done += length
    return done


def read_dead_letters(path: Path) -> list[tuple[str, int, int, int]]:
    """(device, first_seq, last_seq, count) of every record set aside in the dead-letter
    store (kept there, listable and replayable: counted, not lost)."""
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT device, first_seq, last_seq, count FROM dead_letters")
        return [(str(d), int(a), int(b), int(c)) for d, a, b, c in rows]
    finally:
        con.close()


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
    # The lease file (`<path>.seq`: "<leased end> <epoch>") is not read: seqs leased and
    # never handed out are announced as `skipped` gaps when they are given up.
    return high, buffered, gaps


def _neighbour(
    seen: dict[int, tuple[str, str, str]], produced_at: dict[int, float], seq: int, step: int
) -> dict[str, Any] | None:
    """The nearest delivered seq from `seq` on in direction `step` (±1)."""
    for q in range(seq, seq + step * 5000, step):
        if q in seen:
            return {"seq": q, "device": seen[q][0], "ts_agent": round(produced_at[q], 2)}
    return None


def figures(
    args: argparse.Namespace,
    messages: list[Received],
    timeline: Timeline,
    *,
    produced: int,
    buffered: list[tuple[int, int]],
    gap_seqs: list[tuple[int, int]],
    dead_letters: list[tuple[str, int, int, int]],
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
    wire_gaps: dict[str, set[int]] = {}  # reason -> seqs announced as gaps on the wire
    largest_message = 0
    nan_samples = nan_bad = nan_good_null = 0
    decoder = Decoder()
    for index, message in enumerate(messages):
        try:
            decoded = decoder.decode(message.payload)
        except DecodeError:
            continue  # status messages and the like (compact data needs its metadata first)
        if decoded.kind != "data":
            continue
        largest_message = max(largest_message, len(message.payload))
        for g in decoded.gaps:
            seqs = wire_gaps.setdefault(str(g["reason"]), set())
            seqs.update(range(int(g["first_seq"]), int(g["last_seq"]) + 1))
        for s in decoded.samples:
            received += 1
            seq = int(s["seq"])
            ident = (str(s["device"]), str(s["tag"]), str(s["ts_agent"]))
            if s.get("value") is None and s.get("quality") == "good":
                nan_good_null += 1  # a value lost in encoding, published as good
            if seq in seen:
                conflicts += seen[seq] != ident  # the same seq for a different sample
                continue
            seen[seq] = ident
            first_index[seq] = index
            produced_at[seq] = datetime.fromisoformat(str(s["ts_agent"])).timestamp()
            if s["device"] == "nan" and s["tag"] == "bad_float":
                nan_samples += 1
                nan_bad += s.get("quality") == "bad"
    still = {q for a, b in buffered for q in range(a, b + 1)}
    gapped = {q for a, b in gap_seqs for q in range(a, b + 1)}
    for seqs in wire_gaps.values():
        gapped |= seqs
    per_device = device_figures(seen, elapsed_s)
    # A dead letter's samples are the seqs of its record that were not delivered.
    set_aside = {q for _, a, b, _ in dead_letters for q in range(a, b + 1)} - set(seen)
    missing = [q for q in range(1, produced + 1) if q not in seen and q not in still]
    lost = [q for q in missing if q not in gapped and q not in set_aside]
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
        "lost_ranges": _ranges(lost)[:20],
        # Who sits next to each lost range, by the ts_agent (Unix s) of the seqs just
        # outside it: compare with the events' "at" to place a loss on the timeline.
        "lost_context": [
            {
                "range": r,
                "before": _neighbour(seen, produced_at, int(r.split("-")[0]) - 1, -1),
                "after": _neighbour(seen, produced_at, int(r.split("-")[-1]) + 1, 1),
            }
            for r in _ranges(lost)[:5]
        ],
        "max_backlog": max_backlog,
        "resume_after_kill_s": resumes,
        "rss_kib_start": rss[0],
        "rss_kib_end": rss[1],
        "rss_kib_max": rss[2],
        "agent_exit": agent_exit,
        "events": events,
        "devices_delivered": per_device,
        "dead_lettered": {
            d: sum(c for dd, _, _, c in dead_letters if dd == d)
            for d in sorted({d for d, *_ in dead_letters})
        },
        "gaps_on_wire": {reason: len(seqs) for reason, seqs in sorted(wire_gaps.items())},
        "largest_message_bytes": largest_message,
        "max_packet_bytes": POISON_MAX_PACKET if args.poison else None,
        "nan_samples": nan_samples,
        "nan_bad_quality": nan_bad,
        "null_good_samples": nan_good_null,
    }


def _ranges(seqs: list[int]) -> list[str]:
    """[1, 2, 3, 7] -> ["1-3", "7"]: lost seqs, readable."""
    out: list[str] = []
    for q in seqs:
        if out and int(out[-1].split("-")[-1]) == q - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{q}"
        else:
            out.append(str(q))
    return out


def device_figures(seen: dict[int, tuple[str, str, str]], elapsed_s: float) -> dict[str, Any]:
    """Per device: distinct samples and polls (distinct ts_agent) delivered, polls/s."""
    samples: dict[str, int] = {}
    polls: dict[str, set[str]] = {}
    for device, _tag, ts in seen.values():
        samples[device] = samples.get(device, 0) + 1
        polls.setdefault(device, set()).add(ts)
    return {
        device: {
            "samples": samples[device],
            "polls": len(polls[device]),
            "polls_per_s": round(len(polls[device]) / elapsed_s, 2) if elapsed_s > 0 else None,
        }
        for device in sorted(samples)
    }


def poison_problems(result: dict[str, Any]) -> list[str]:
    """What the poison run must show; empty when every poison was handled as documented."""
    problems = []
    if result["null_good_samples"]:
        problems.append(
            f"{result['null_good_samples']} samples published as null with good quality"
        )
    if result["nan_samples"] and result["nan_bad_quality"] != result["nan_samples"]:
        problems.append("a NaN was published with a quality other than bad")
    limit = result["max_packet_bytes"]
    if limit is not None and result["largest_message_bytes"] > limit:
        problems.append(f"a message of {result['largest_message_bytes']} B > the broker's {limit}")
    if limit is not None and "big" not in result["devices_delivered"]:
        problems.append("the oversize device delivered nothing")
    if limit is not None and "denied" in result["devices_delivered"]:
        problems.append("the ACL-denied device's data reached the subscriber")
    return problems


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
        ("gaps on the wire", result["gaps_on_wire"]),
        ("dead-lettered samples", result["dead_lettered"]),
        (
            "per device (samples, polls/s)",
            ", ".join(
                f"{d} {v['samples']} {v['polls_per_s']}"
                for d, v in result["devices_delivered"].items()
            ),
        ),
        (
            "largest message (B)",
            f"{result['largest_message_bytes']} (limit {result['max_packet_bytes']})",
        ),
        ("NaN samples (bad quality)", f"{result['nan_samples']} ({result['nan_bad_quality']})"),
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
    parser.add_argument(
        "--damages", type=int, default=1, help="buffer file damaged this often (poison run)"
    )
    parser.add_argument(
        "--no-poison",
        dest="poison",
        action="store_false",
        help="no poison devices (ACL-denied, oversize, NaN) and no buffer damage",
    )
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
    problems = poison_problems(result)
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    return 0 if result["lost"] == 0 and result["seq_conflicts"] == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
