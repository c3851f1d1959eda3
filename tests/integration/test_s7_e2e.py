"""S7 end to end: the real agent process, the S7 simulator (in-process in simulator mode,
or as its own `edge-agent simulate` process that a test kills and restarts), and a real
mosquitto. 500 tags across DB words and M/I/Q bits poll at 100 ms with exact values."""

from __future__ import annotations

import signal
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import AgentProcess, cli, samples_of, wait_until
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration

REAL = struct.unpack(">f", struct.pack(">f", 21.5))[0]


def plant_tags() -> tuple[list[str], dict[str, Any]]:
    """500 tags: 200 REAL and 100 INT in DBs, 100 M bits, 50 I bits, 40 Q words and ten
    tags of the other types. Returns YAML lines and the expected published values."""
    lines: list[str] = []
    expected: dict[str, Any] = {}

    def add(name: str, address: str, typ: str, value: Any, extra: str = "") -> None:
        shown = f'"{value}"' if isinstance(value, str) else str(value).lower()
        lines.append(
            f"      - {{name: {name}, address: {address}, type: {typ}{extra}, "
            f"simulate: {{generator: constant, value: {shown}}}}}"
        )

    for i in range(200):
        add(f"temp{i}", f"DB10.DBD{4 * i}", "real", REAL + i)
        expected[f"temp{i}"] = REAL + i
    for i in range(100):
        # Published = raw * 0.1: the simulator writes raw = value / 0.1.
        add(f"press{i}", f"DB20.DBW{2 * i}", "int", i * 10, ", scale: 0.1")
        expected[f"press{i}"] = pytest.approx(i * 10, abs=1e-9)
    for i in range(100):
        add(f"m{i}", f"M{i // 8}.{i % 8}", "bool", i % 3 == 0)
        expected[f"m{i}"] = i % 3 == 0
    for i in range(50):
        add(f"in{i}", f"I{i // 8}.{i % 8}", "bool", i % 2 == 1)
        expected[f"in{i}"] = i % 2 == 1
    for i in range(40):
        add(f"q{i}", f"QW{2 * i}", "word", 1000 + i)
        expected[f"q{i}"] = 1000 + i
    others: list[tuple[str, str, str, Any, str]] = [
        ("mode", "DB1.DBB0", "byte", 7, ""),
        ("status", "DB1.DBW2", "word", 65535, ""),
        ("count", "DB1.DBD4", "dint", -100000, ""),
        ("hours", "DB1.DBD8", "dword", 4000000000, ""),
        ("energy", "DB1.DBB12", "lreal", 12345.678, ""),
        ("recipe", "DB1.DBB20", "string", "ABS-12", ", length: 16"),
        ("changed", "DB1.DBB38", "date_and_time", "2026-11-30T23:59:59.999", ""),
        ("cycle", "MD100", "dint", 850, ""),
        ("alarm", "MW104", "word", 3, ""),
        ("lamp", "Q100.0", "bool", True, ""),
    ]
    for name, address, typ, value, extra in others:
        add(name, address, typ, value, extra)
        expected[name] = value
    assert len(expected) == 500
    return lines, expected


def config(tmp: Path, broker: MosquittoBroker, port: int, *, tags: list[str]) -> Path:
    path = tmp / "s7.yaml"
    body = "\n".join(tags)
    path.write_text(
        f"""\
agent: {{id: gw-s7}}
mqtt: {{port: {broker.port}, reconnect_min_s: 0.2, reconnect_max_s: 1}}
buffer: {{path: {tmp / "buffer.db"}}}
logging: {{level: info, format: json}}
devices:
  - name: press
    protocol: s7
    host: 127.0.0.1
    port: {port}
    slot: 2
    interval_s: 0.1
    timeout_s: 0.5
    backoff_min_s: 0.2
    backoff_max_s: 1
    tags:
{body}
"""
    )
    return path


def latest(messages: Any) -> dict[str, dict[str, Any]]:
    return {str(s["tag"]): s for s in samples_of(messages)}


def test_500_tags_at_100_ms_exact_values_in_simulator_mode(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    lines, expected = plant_tags()
    path = config(tmp_path, broker, 0, tags=lines)
    planned = cli("plan", str(path))
    assert planned.returncode == 0, planned.stderr
    assert "500 tags" in planned.stdout
    assert "3 requests per poll" in planned.stdout
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(path), "--simulate") as agent,
    ):
        wait_until(
            lambda: len([s for s in samples_of(sub.messages()) if s["tag"] == "temp0"]) >= 20,
            60,
            "20 polls of every tag",
            agent,
        )
        assert agent.terminate() == 0
    values = latest(sub.messages())
    assert set(values) == set(expected)
    assert {t: s["quality"] for t, s in values.items()} == {t: "good" for t in expected}
    assert {t: s["value"] for t, s in values.items()} == expected


def test_simulator_killed_and_restarted_bad_then_recovered(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    lines = [
        "      - {name: speed, address: DB1.DBD0, type: real, "
        "simulate: {generator: constant, value: 1.5}}",
        "      - {name: on, address: M0.0, simulate: {generator: constant, value: true}}",
    ]
    served = config(tmp_path, broker, 0, tags=lines)
    sim = AgentProcess(tmp_path / "sim.log", "simulate", str(served)).start()
    try:
        name, protocol, endpoint = sim.read_line(60).split("\t")
        assert (name, protocol) == ("press", "s7")
        port = int(endpoint.rsplit(":", 1)[1])
        path = config(tmp_path, broker, port, tags=lines)
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(path)) as agent,
        ):
            wait_until(
                lambda: latest(sub.messages()).get("speed", {}).get("quality") == "good",
                60,
                "good data",
                agent,
            )
            assert latest(sub.messages())["speed"]["value"] == 1.5
            assert sim.proc is not None
            sim.proc.send_signal(signal.SIGKILL)
            sim.close()
            # The outage is published once, possibly before this line runs: everything
            # before it was good, so look at all the messages.
            n = 0
            wait_until(
                lambda: any(s["quality"] == "bad" for s in samples_of(sub.messages()[n:])),
                60,
                "bad while down",
                agent,
            )
            down = [s for s in samples_of(sub.messages()[n:]) if s["quality"] == "bad"]
            assert down[0]["value"] is None
            sim = AgentProcess(tmp_path / "sim2.log", "simulate", str(path)).start()
            assert sim.read_line(60).split("\t")[2] == endpoint
            n = len(sub.messages())
            wait_until(
                lambda: (
                    {"speed", "on"}
                    <= {
                        str(s["tag"])
                        for s in samples_of(sub.messages()[n:])
                        if s["quality"] == "good"
                    }
                ),
                60,
                "data back after the restart",
                agent,
            )
            assert agent.terminate() == 0
        assert agent.log().count('"device.recovered"') >= 1
    finally:
        sim.close()
