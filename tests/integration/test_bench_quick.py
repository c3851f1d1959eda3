"""Every benchmark scenario runs in quick mode and prints valid figures.

This keeps bench/ working; it never asserts speed (machines are noisy). Each scenario runs
as users run it, `python -m bench run NAME --quick`, with real mosquitto, simulators and
the agent process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.scenarios import SCENARIOS
from tests.support.broker import require_mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

NUMBERS = (
    "delivered_per_s",
    "expected_per_s",
    "agent_cpu_pct",
    "agent_rss_peak_mb",
    "first_value_s",
    "window_s",
)


def run_quick(name: str, out: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", name, "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stdout
    result: dict[str, Any] = orjson.loads(lines[0])
    return proc, result


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_runs_and_prints_figures(name: str, tmp_path: Path) -> None:
    require_mosquitto()
    proc, result = run_quick(name, tmp_path)
    assert result["scenario"] == name
    assert result["quick"] is True
    for key in NUMBERS:
        assert isinstance(result[key], int | float), key
    assert result["values_total"] > 0
    assert result["agent_exit"] == 0
    assert result["duplicates"] >= 0
    assert set(result["latency_agent_ms"]) == {"p50", "p99", "max"}
    assert result["latency_agent_ms"]["p50"] is not None
    if SCENARIOS[name].protocol == "modbus":
        assert result["requests_per_poll"] > 0
        assert result["requests_minimum"] >= 1
        assert result["latency_e2e_ms"]["p50"] is not None
    if SCENARIOS[name].outage_s:
        assert "caught_up" in result["drain"]
    # The readable table follows the JSON line.
    assert "delivered/s" in proc.stdout
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 1


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_bench_leaves_no_simulator_or_agent_running(tmp_path: Path) -> None:
    # A test's timeout SIGKILLs the bench: its simulators and agent must not outlive it
    # and load the machine for the tests after it.
    require_mosquitto()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "idle", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "measuring" in line:
                break
        kids = _children(proc.pid)
        assert len(kids) >= 3  # broker, simulator, agent, meter...
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.2)
    left = [k for k in kids if _alive(k)]
    names = {k: _cmdline(k) for k in left}
    for k in left:
        with contextlib.suppress(OSError):
            os.kill(k, signal.SIGKILL)
    assert not left, f"children outlived the bench: {names}"
