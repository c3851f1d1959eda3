"""Derived data end to end: the real agent process polling a real simulator, publishing
to a real mosquitto. One record per shot through a broker outage and an agent SIGKILL;
report by exception and windows as a subscriber sees them."""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.agent_proc import AgentProcess, assert_continuous, seqs, wait_until
from tests.support.broker import MosquittoBroker
from tests.support.payloads import decoded
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration

MACHINE = """\
  - name: imm
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    interval_s: 0.1
    timeout_s: 0.5
    retries: 0
    backoff_min_s: 0.2
    backoff_max_s: 1
    tags:
      - {{ name: shot, address: 0, type: uint32,
          simulate: {{ generator: counter, value: 100, step: 1, period_s: 0.5 }} }}
      - {{ name: pressure, address: 2, type: float32, unit: bar,
          simulate: {{ generator: sine, min: 900, max: 1100, period_s: 3 }} }}
      - {{ name: ok, table: coil, address: 0, type: bool,
          simulate: {{ generator: toggle, period_s: 1, value: true }} }}
{extra}
"""

CYCLES = """\
    report: { deadband_abs: 50.0, max_interval_s: 2 }
    cycles:
      - { name: shot_cycle, trigger: { tag: shot, on: change }, tags: [pressure, ok] }
    windows:
      - { tags: [pressure], length_s: 1, features: [count, mean, min, max, std] }
"""


def write_config(tmp: Path, broker: MosquittoBroker, devices: str, name: str) -> Path:
    path = tmp / name
    path.write_text(
        f"""\
agent: {{ id: gw-derive }}
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  reconnect_min_s: 0.2
  reconnect_max_s: 1
buffer:
  path: {tmp / "buffer.db"}
logging:
  level: info
  format: json
devices:
{devices}
"""
    )
    return path


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def unique_samples(messages: list[Received]) -> list[dict[str, Any]]:
    """Samples deduplicated on (epoch, seq) — a QoS 1 re-send is the same sample."""
    seen: set[tuple[str, int]] = set()
    out: list[dict[str, Any]] = []
    for d in decoded(m.payload for m in messages):
        for s in d.samples:
            key = (str(d.epoch), s["seq"])
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def cycle_heads(messages: list[Received]) -> list[dict[str, Any]]:
    return [s for s in unique_samples(messages) if s["tag"] == "shot_cycle"]


def test_one_record_per_shot_through_an_outage_and_a_sigkill(tmp_path: Path) -> None:
    with MosquittoBroker(persistent=True) as broker:
        served = write_config(tmp_path, broker, MACHINE.format(port=0, extra=""), "sim.yaml")
        with AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim:
            port = int(sim.read_line().split("\t")[2].rsplit(":", 1)[1])
            config = write_config(
                tmp_path, broker, MACHINE.format(port=port, extra=CYCLES), "agent.yaml"
            )
            sub = Subscriber(
                "127.0.0.1", broker.port, "edge/#", client_id="consumer", session_expiry_s=3600
            )
            with sub:
                first = AgentProcess(tmp_path / "agent1.log", "run", str(config))
                with first:
                    wait_until(lambda: len(cycle_heads(sub.messages())) >= 4, 60, "cycles", first)
                    broker.stop()
                    time.sleep(3)  # shots go on; records wait in the buffer
                    broker.start()
                    seen = len(cycle_heads(sub.messages()))
                    wait_until(
                        lambda: len(cycle_heads(sub.messages())) >= seen + 8, 60, "backlog", first
                    )
                    first.kill()  # SIGKILL: no stop, no flush
                time.sleep(1.5)  # the machine makes about three shots meanwhile
                second = AgentProcess(tmp_path / "agent2.log", "run", str(config))
                with second:
                    seen = len(cycle_heads(sub.messages()))
                    wait_until(
                        lambda: len(cycle_heads(sub.messages())) >= seen + 4, 60, "more", second
                    )
                    assert second.terminate() == 0, second.log()
                time.sleep(0.5)
                messages = sub.messages()
    heads = cycle_heads(messages)
    ids = [h["cycle"] for h in heads]
    # One record per shot: no cycle id twice, in order.
    assert len(ids) == len(set(ids)), ids
    assert ids == sorted(ids)
    # None skipped silently: every jump is announced in the record that follows it.
    jumps = 0
    for prev, head in itertools.pairwise(heads):
        if head["cycle"] == prev["cycle"] + 1:
            assert "missed" not in head, head
        else:
            jumps += 1
            assert head["missed"] == {
                "first": prev["cycle"] + 1,
                "last": head["cycle"] - 1,
                "count": head["cycle"] - prev["cycle"] - 1,
            }, (prev, head)
    assert jumps <= 1  # only the time the agent was dead
    assert any("missed" in h for h in heads)  # the kill did cost shots, announced
    # Every record carries its columns, each with its quality, all of the trigger's poll.
    samples = unique_samples(messages)
    by_cycle: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        if "cycle" in s:
            by_cycle.setdefault(s["cycle"], []).append(s)
    for cycle_id, record in by_cycle.items():
        assert [s["tag"] for s in record] == [
            "shot_cycle",
            "shot_cycle.pressure",
            "shot_cycle.ok",
        ], cycle_id
        assert {s["ts_agent"] for s in record} == {record[0]["ts_agent"]}
        assert all(s["quality"] == "good" for s in record)
        assert record[1]["unit"] == "bar"
    # Seqs: one stream, no gap, across the outage and the kill (held-back samples
    # take none; a kill may leave a leased block unused, which the agent reports).
    received = seqs(messages)
    assert min(received) == 1
    assert_gaps_only_announced(messages)
    # Report by exception and windows reached the wire as documented.
    tags = {s["tag"] for s in samples}
    assert {"pressure.mean", "pressure.std", "pressure.good_share"} <= tags
    assert "pressure" not in tags  # publish_raw false: the raw readings stayed local
    shots = [s for s in samples if s["tag"] == "shot"]
    assert shots, "the counter is published raw, by exception"
    windows = [s for s in samples if s["tag"] == "pressure.count"]
    assert windows
    assert all(ts(s["window_start"]) < ts(s["ts_agent"]) for s in windows)


def assert_gaps_only_announced(messages: list[Received]) -> None:
    """Every seq missing from what arrived is in a gap notice (or, after a SIGKILL,
    in the leased block the next start announces as skipped)."""
    announced: set[int] = set()
    for m in messages:
        body = orjson.loads(m.payload)
        for g in body.get("gaps") or [] if isinstance(body, dict) else []:
            announced.update(range(g["first_seq"], g["last_seq"] + 1))
    received = set(seqs(messages))
    missing = set(range(1, max(received) + 1)) - received
    assert missing <= announced, sorted(missing - announced)[:20]


def test_report_by_exception_on_the_wire(tmp_path: Path, broker: MosquittoBroker) -> None:
    extra = """\
    report: { deadband_abs: 1000.0, max_interval_s: 1 }
"""
    devices = MACHINE.format(port=0, extra=extra).replace(
        "type: uint32,", "type: uint32, report: { mode: every_poll },"
    )
    config = write_config(tmp_path, broker, devices, "agent.yaml")
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(
            lambda: sum(s.get("repeat") is True for s in unique_samples(sub.messages())) >= 2,
            60,
            "heartbeats",
            agent,
        )
        assert agent.terminate() == 0
    samples = unique_samples(sub.messages())
    pressure = [s for s in samples if s["tag"] == "pressure"]
    shots = [s for s in samples if s["tag"] == "shot"]
    # The 200 bar sine never leaves a 1000 bar band: the first value, then repeats of it.
    assert not pressure[0].get("repeat")
    assert all(s.get("repeat") is True for s in pressure[1:])
    assert {(s["value"], s["ts_agent"], s["ts_source"]) for s in pressure} == {
        (pressure[0]["value"], pressure[0]["ts_agent"], pressure[0]["ts_source"])
    }
    assert len(shots) > len(pressure)  # every_poll for the counter: a sample per poll
    assert_continuous(seqs(sub.messages()))


def test_at_trigger_reads_the_captured_tags_again(tmp_path: Path, broker: MosquittoBroker) -> None:
    # pressure and ok are polled once a minute on their own: only the re-read at each
    # shot can give every record fresh, good columns.
    extra = """\
    poll_groups:
      slow: { interval_s: 60 }
    cycles:
      - { name: shot_cycle, trigger: { tag: shot, on: change }, tags: [pressure, ok],
          read: at_trigger, read_timeout_s: 5 }
"""
    devices = (
        MACHINE.format(port=0, extra=extra)
        .replace("unit: bar,", "unit: bar, group: slow,")
        .replace("type: bool,", "type: bool, group: slow,")
    )
    config = write_config(tmp_path, broker, devices, "agent.yaml")
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(lambda: len(cycle_heads(sub.messages())) >= 4, 60, "cycles", agent)
        assert agent.terminate() == 0
    by_cycle: dict[int, list[dict[str, Any]]] = {}
    for s in unique_samples(sub.messages()):
        if "cycle" in s:
            by_cycle.setdefault(s["cycle"], []).append(s)
    assert len(by_cycle) >= 4
    pressures = set()
    for record in by_cycle.values():
        head, pressure, ok = record
        assert (pressure["tag"], ok["tag"]) == ("shot_cycle.pressure", "shot_cycle.ok")
        assert pressure["quality"] == "good", record
        assert ok["quality"] == "good", record
        assert ts(pressure["ts_agent"]) > ts(head["ts_agent"])  # read after the trigger
        pressures.add(pressure["value"])
    assert len(pressures) == len(by_cycle)  # a fresh reading each time (a sine)


def test_a_device_down_mid_window_still_gets_its_window(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    served = write_config(tmp_path, broker, MACHINE.format(port=0, extra=""), "sim.yaml")
    extra = """\
    down_report_interval_s: 3600
    windows:
      - { tags: [pressure], length_s: 1, features: [count, mean] }
"""
    with (
        AgentProcess(tmp_path / "sim.log", "simulate", str(served)) as sim,
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
    ):
        port = int(sim.read_line().split("\t")[2].rsplit(":", 1)[1])
        config = write_config(
            tmp_path, broker, MACHINE.format(port=port, extra=extra), "agent.yaml"
        )
        with AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent:

            def means() -> list[dict[str, Any]]:
                return [s for s in unique_samples(sub.messages()) if s["tag"] == "pressure.mean"]

            wait_until(lambda: any(m["quality"] == "good" for m in means()), 60, "windows", agent)
            sim.kill()  # the device goes down mid-window and never comes back
            # Only the one all-bad report at the transition is read (the next would be an
            # hour later): the agent's clock must close that window.
            wait_until(
                lambda: any(
                    m["quality"] != "good" and m["reason"] != "partial window" for m in means()
                ),
                60,
                "the window of the outage",
                agent,
            )
            assert agent.terminate() == 0
    outage = [m for m in means() if m["quality"] != "good" and m["reason"] != "partial window"]
    first = outage[0]
    # some good readings and the bad one (uncertain), or only the bad one, at a boundary
    assert first["reason"].endswith("readings not good") or (
        first["reason"] == "no good readings" and first["quality"] == "bad"
    ), first
