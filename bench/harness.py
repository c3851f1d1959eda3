"""Building blocks of the scenarios: child processes, /proc figures, the measuring
subscriber and the result record.

Every component runs in its own process, as in production: mosquitto, the simulators
(`bench.sim_modbus` / `bench.sim_opcua`) and the agent (`python -m agent.cli run CONFIG`).
This process only hosts the measuring subscriber (a paho network thread), whose CPU is
reported too, so the figures show what the measurement itself costs a 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.layouts.decode import DecodeError, Decoder
from tests.support.children import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLOCK_TAG = "clock"


# ------------------------------------------------------------------ /proc figures


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its waited-for children, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    return out


def machine() -> str:
    """A one-line description of this machine, for the README table."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPU ({model}), Python {sys.version.split()[0]}"


# ------------------------------------------------------------------ child processes


class Child:
    """A child process with stdout piped (for JSON lines) and stderr in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Child:
        with self.log_path.open("ab") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                bufsize=0,  # unbuffered: select() must see every line we have not read
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def json_line(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """The next stdout line, parsed as JSON."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"{self.name}: no output within {timeout_s} s; {self.tail()}")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited; {self.tail()}")
            text = line.decode(errors="replace").strip()
            if text.startswith("{"):
                parsed: dict[str, Any] = orjson.loads(text)
                return parsed

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "log tail:\n" + "\n".join(text.splitlines()[-lines:])
        return "no log"


# ------------------------------------------------------------------ measuring subscriber


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


@dataclass
class Arrival:
    """One received message, reduced to what the figures need."""

    t: float  # arrival, epoch seconds
    device: str
    values: int
    ts_agent: float  # of the message's first sample
    e2e_s: float | None  # source write → arrival, when the message tells


@dataclass
class MeterStats:
    arrivals: list[Arrival] = field(default_factory=list)
    values: int = 0
    bad: int = 0
    duplicates: int = 0
    max_seq: int = 0


class Meter:
    """Subscribes to `topic` at QoS 1 and records every batch message's figures.

    Seq numbers go into a bitmap, so duplicates and gaps are exact without keeping the
    samples. With `session=True` the broker keeps a persistent session for us, so
    nothing is missed while we reconnect after a broker restart."""

    def __init__(self, host: str, port: int, topic: str, *, session: bool = False) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.stats = MeterStats()
        self._seen = bytearray(1 << 20)
        # Every layout through the reference decoder (compact: subscribe to its metadata).
        self._decoder = Decoder()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._session = session
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="bench-meter" if session else "",
            protocol=mqtt.MQTTv5,
        )
        # paho's stubs say int, but it only compares and sleeps: a short delay keeps the
        # reconnect after a broker restart from biasing the drain figure.
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_disconnect = lambda *a: self._subscribed.clear()
        self._client.on_message = self._on_message
        self.cpu_s = 0.0

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        t = time.time()
        try:
            decoded = self._decoder.decode(bytes(msg.payload))
        except DecodeError:
            return  # not a data message of the agent (or compact data before its metadata)
        samples = decoded.samples
        if not samples:
            return
        seen = self._seen
        dup = bad = 0
        top = 0
        e2e: float | None = None
        for s in samples:
            seq = s["seq"]
            if seq >= len(seen) * 8:
                seen.extend(bytes(max(len(seen), seq // 8 + 1 - len(seen))))
            byte, bit = seq >> 3, 1 << (seq & 7)
            if seen[byte] & bit:
                dup += 1
            else:
                seen[byte] |= bit
            top = max(top, seq)
            if s["quality"] == "bad":
                bad += 1
            elif s["tag"] == CLOCK_TAG and e2e is None and s["value"] is not None:
                now_ms = int(t * 1000) % (1 << 32)
                e2e = ((now_ms - int(s["value"])) % (1 << 32)) / 1000
        first = samples[0]
        if e2e is None and first.get("ts_source"):
            e2e = t - _epoch(first["ts_source"])
        arrival = Arrival(t, str(decoded.device), len(samples), _epoch(first["ts_agent"]), e2e)
        with self._lock:
            st = self.stats
            st.arrivals.append(arrival)
            st.values += len(samples)
            st.bad += bad
            st.duplicates += dup
            st.max_seq = max(st.max_seq, top)

    def start(self, timeout_s: float = 10.0) -> Meter:
        if self._session:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 600
            self._client.connect(
                self.host, self.port, keepalive=30, clean_start=False, properties=props
            )
        else:
            self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise TimeoutError("measuring subscriber: no SUBACK")
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def snapshot(self) -> tuple[int, int]:
        """(values received, messages received) so far."""
        with self._lock:
            return self.stats.values, len(self.stats.arrivals)

    def unique_seqs(self) -> int:
        with self._lock:
            return sum(bin(b).count("1") for b in self._seen)

    def wait_values(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.snapshot()[0] >= n:
                return True
            time.sleep(0.05)
        return False


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def latency_ms(values: list[float]) -> dict[str, float | None]:
    s = sorted(values)
    r = {
        "p50": percentile(s, 50),
        "p99": percentile(s, 99),
        "max": s[-1] if s else None,
    }
    return {k: (round(v * 1000, 1) if v is not None else None) for k, v in r.items()}
