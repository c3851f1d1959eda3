"""MELSEC end to end through the real agent process: `run --simulate` with a 500-tag config
at 100 ms, samples at a real mosquitto with exact values, the plan's request count, and a
refused address published as bad with the CPU's end code."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import AgentProcess, cli, samples_of, wait_until
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def five_hundred_tags() -> tuple[list[str], dict[str, Any]]:
    """YAML lines of 500 tags over D, W, M, X and TN, and the value each must publish."""
    lines: list[str] = []
    expected: dict[str, Any] = {}

    def tag(name: str, body: str, value: Any) -> None:
        lines.append(f"      - {{name: {name}, {body}}}")
        expected[name] = value

    for i in range(250):
        tag(f"d{i}", f"address: D{i}, simulate: {{generator: constant, value: {i - 100}}}", i - 100)
    for i in range(100):
        raw = 1000 + i
        tag(
            f"f{i}",
            f"address: D{2000 + 2 * i}, type: float32, "
            f"simulate: {{generator: constant, value: {raw / 4}}}",
            raw / 4,
        )
    for i in range(50):
        # scaled: the simulator stores value / scale, the agent publishes raw * scale
        tag(
            f"w{i}",
            f"address: W{i:X}, scale: 0.5, simulate: {{generator: constant, value: {i}}}",
            i,
        )
    for i in range(60):
        on = "true" if i % 3 == 0 else "false"
        tag(
            f"m{i}",
            f"address: M{100 + i}, simulate: {{generator: constant, value: {on}}}",
            i % 3 == 0,
        )
    for i in range(30):
        on = "true" if i % 2 else "false"
        tag(f"x{i}", f"address: X{i:o}, simulate: {{generator: constant, value: {on}}}", i % 2 == 1)
    for i in range(10):
        tag(f"tn{i}", f"address: TN{i}, simulate: {{generator: constant, value: {10 * i}}}", 10 * i)
    assert len(expected) == 500
    return lines, expected


def write_config(tmp: Path, broker: MosquittoBroker, tag_lines: list[str]) -> Path:
    path = tmp / "melsec.yaml"
    body = "\n".join(tag_lines)
    path.write_text(
        f"""\
agent: {{id: gw-melsec}}
mqtt: {{port: {broker.port}, reconnect_min_s: 0.2, reconnect_max_s: 1}}
buffer: {{path: {tmp / "buffer.db"}}}
logging: {{level: info, format: json}}
devices:
  - name: fx5u
    protocol: melsec
    series: iq-f
    host: 127.0.0.1
    port: 0
    interval_s: 0.1
    timeout_s: 1.0
    tags:
{body}
""",
        encoding="utf-8",
    )
    return path


def test_500_tags_at_100_ms_arrive_exact_with_the_planned_requests(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    lines, expected = five_hundred_tags()
    config = write_config(tmp_path, broker, lines)
    plan = cli("plan", str(config))
    assert plan.returncode == 0, plan.stderr
    assert "group default every 0.1 s: 500 tags, 2 requests per poll" in plan.stdout
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):

        def polls() -> int:
            return sum(1 for s in samples_of(sub.messages()) if s["tag"] == "d0")

        wait_until(lambda: polls() >= 10, 60, "ten polls of 500 tags", agent)
        assert agent.terminate() == 0
    samples = samples_of(sub.messages())
    assert {s["device"] for s in samples} == {"fx5u"}
    assert all(s["quality"] == "good" for s in samples), [
        s for s in samples if s["quality"] != "good"
    ][:3]
    latest = {str(s["tag"]): s["value"] for s in samples}
    assert latest == expected
    for s in samples:
        assert s["value"] == expected[str(s["tag"])]


def test_a_refused_address_is_published_bad_with_its_end_code(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    lines = [
        "      - {name: last, address: D7999, simulate: {generator: constant, value: 5}}",
        "      - {name: past_end, address: D8000}",
        "      - {name: run, address: M0, simulate: {generator: constant, value: true}}",
    ]
    config = write_config(tmp_path, broker, lines)
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(
            lambda: len([s for s in samples_of(sub.messages()) if s["tag"] == "past_end"]) >= 3,
            60,
            "bad samples of the refused tag",
            agent,
        )
        assert agent.terminate() == 0
        log = agent.log()
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for s in samples_of(sub.messages()):
        by_tag.setdefault(str(s["tag"]), []).append(s)
    assert {s["value"] for s in by_tag["last"]} == {5}
    assert {s["value"] for s in by_tag["run"]} == {True}
    assert all(s["quality"] == "good" for s in by_tag["last"] + by_tag["run"])
    bad = by_tag["past_end"][-1]
    assert bad["quality"] == "bad"
    assert bad["value"] is None
    assert "melsec.block.isolated" in log
    assert bad["reason"] == "end code 0xC056 (the read runs past the device's largest address)"
    assert bad["code"] == 0xC056


def test_a_cpu_that_goes_away_is_bad_and_read_again_when_it_returns(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    lines = ["      - {name: count, address: D0, simulate: {generator: constant, value: 42}}"]
    served = write_config(tmp_path, broker, lines)
    sim = AgentProcess(tmp_path / "sim.log", "simulate", str(served)).start()
    try:
        name, protocol, endpoint = sim.read_line(60).split("\t")
        assert (name, protocol) == ("fx5u", "melsec")
        port = endpoint.rsplit(":", 1)[1]
        config = tmp_path / "agent.yaml"
        text = served.read_text(encoding="utf-8").replace("port: 0", f"port: {port}")
        text = text.replace("interval_s: 0.1", "interval_s: 0.1\n    backoff_min_s: 0.1")
        config.write_text(
            text.replace("backoff_min_s: 0.1", "backoff_min_s: 0.1\n    backoff_max_s: 0.5")
        )
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent,
        ):
            wait_until(lambda: bool(samples_of(sub.messages())), 60, "good data", agent)
            assert samples_of(sub.messages())[0]["value"] == 42
            assert sim.proc is not None
            sim.proc.send_signal(signal.SIGKILL)
            sim.close()
            # The outage is published once (a down device reports again only every
            # down_report_interval_s), possibly before this line runs: look at all of it.
            wait_until(
                lambda: any(s["quality"] == "bad" for s in samples_of(sub.messages())),
                60,
                "bad while the CPU is away",
                agent,
            )
            reasons = {s["reason"] for s in samples_of(sub.messages()) if s["quality"] == "bad"}
            assert reasons <= {"connection lost", "connection refused"}, reasons
            sim = AgentProcess(tmp_path / "sim2.log", "simulate", str(config)).start()
            assert sim.read_line(60).split("\t")[2] == endpoint
            n = len(sub.messages())
            wait_until(
                lambda: any(
                    s["quality"] == "good" and s["value"] == 42
                    for s in samples_of(sub.messages()[n:])
                ),
                60,
                "data back after the restart",
                agent,
            )
            assert agent.terminate() == 0
    finally:
        sim.close()


def test_melsec_read_prints_values_and_end_codes(tmp_path: Path, broker: MosquittoBroker) -> None:
    lines = [
        "      - {name: a, address: D100, simulate: {generator: constant, value: -5}}",
        "      - {name: f, address: D102, type: float32, simulate: {generator: constant, "
        "value: 1.5}}",
        "      - {name: x, address: X17, simulate: {generator: constant, value: true}}",
    ]
    served = write_config(tmp_path, broker, lines)
    with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
        endpoint = sim.read_line(60).split("\t")[2]
        args = ("melsec", "read", endpoint, "--series", "iq-f")
        done = cli(*args, "D100", "D102:float32", "X17", "X16", "D8000")
        assert done.returncode == 1, done.stderr
        assert done.stdout.splitlines() == [
            "D100\tint16\t-5",
            "D102\tfloat32\t1.5",
            "X17\tbool\tTrue",
            "X16\tbool\tFalse",
            "D8000\tbad\tend code 0xC056 (the read runs past the device's largest address)",
        ]
        done = cli(*args, "D100", "X17")
        assert (done.returncode, done.stdout) == (0, "D100\tint16\t-5\nX17\tbool\tTrue\n")
        done = cli(*args, "X18")
        assert done.returncode == 2
        assert "'18' is not an octal X number" in done.stderr
