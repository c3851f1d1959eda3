"""Run the real agent (`python -m agent.cli ...`) as a child process, for tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.layouts.decode import DecodeError, Decoder, MetaMissing
from tests.support.subscriber import Received

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one `edge-agent` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )


class AgentProcess:
    """`edge-agent <command> <config> [args]` in the background, stderr to a log file."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", *self.args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
            )
        return self

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def read_line(self, timeout_s: float = 30.0) -> str:
        """Next stdout line (for `edge-agent simulate`, which prints its endpoints)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        if self._lines is None:
            self._lines = queue.Queue()
            stdout = self.proc.stdout
            lines = self._lines

            def pump() -> None:  # readline() buffers: a thread, not select(), sees every line
                for raw in iter(stdout.readline, b""):
                    lines.put(raw.decode().rstrip("\n"))

            threading.Thread(target=pump, daemon=True).start()
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout_s} s; log:\n{self.log()}") from None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill the process if it still runs, and release its pipe."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def samples_of(messages: list[Received]) -> list[dict[str, object]]:
    """Every sample in the received data messages of any JSON layout (reference
    decoder), in arrival order; status messages and the like are left out."""
    out: list[dict[str, object]] = []
    decoder = Decoder()
    for m in messages:
        try:
            d = decoder.decode(m.payload)
        except MetaMissing:
            raise
        except DecodeError:
            continue  # not a data message of the agent (status, a test's own)
        out.extend(d.samples)
    return out


def seqs(messages: list[Received]) -> list[int]:
    return [int(s["seq"]) for s in samples_of(messages)]  # type: ignore[call-overload]


def counter_device(name: str, interval_s: float = 0.1) -> str:
    return f"""\
  - name: {name}
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: {interval_s}
    tags:
      - {{name: count, address: 0, type: uint32}}
      - {{name: level, address: 2, type: float32, scale: 2.0}}
"""


def assert_continuous(values: list[int], start: int = 1) -> None:
    unique = sorted(set(values))
    assert unique, "no samples"
    assert unique[0] == start
    missing = sorted(set(range(start, unique[-1] + 1)) - set(unique))
    assert not missing, f"seq gaps: {missing[:20]} ({len(missing)} missing)"


def last_seq_logged(agent: AgentProcess) -> int:
    """The last seq the agent produced, from its JSON log line at stop."""
    for line in reversed(agent.log().splitlines()):
        if '"agent.stopped"' in line:
            return int(json.loads(line)["last_seq"])
    raise AssertionError(f"no agent.stopped line\n{agent.log()}")


def wait_until(cond: Any, timeout_s: float, what: str, proc: AgentProcess | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{proc.log()}" if proc else ""))
