"""The derive stage in the buffer writer: seqs count what leaves, records as stored, the
cycle state saved with the store and picked up after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.buffer.common import record_samples
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig, parse_config
from agent.derive.stage import DeviceDerive
from agent.derive.state import DeriveState, state_path
from agent.normalize import Normalizer, SeqCounter
from agent.runtime.writer import BufferWriter
from drivers.base import RawReading

CONFIG = """\
agent: {id: gw}
mqtt: {port: 1883}
devices:
  - name: imm
    protocol: modbus
    host: 127.0.0.1
    report: { deadband_abs: 1.0 }
    tags:
      - { name: shots, address: 0, type: uint32, report: { mode: every_poll } }
      - { name: p, address: 2, type: float32, unit: bar }
      - { name: vib, address: 4, type: float32 }
    cycles:
      - { name: shot, trigger: { tag: shots, on: change }, tags: [p] }
    windows:
      - { tags: [vib], length_samples: 3, features: [mean] }
"""


async def run_polls(buffer_path: Path, polls: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One agent run: the polls through a writer with the device's derive stage; returns
    every record stored (as samples), oldest first."""
    device = parse_config(CONFIG, "c.yaml").devices[0]
    tags = list(device.tags)  # type: ignore[attr-defined]
    buffer = SqliteBuffer(BufferConfig(path=str(buffer_path)))
    await buffer.open()
    try:
        state = DeriveState(state_path(str(buffer_path)))
        writer = BufferWriter(buffer, lambda *a: None, derive_state=state)
        derive = DeviceDerive(device, tags, state)
        sink, _latest = writer.sink(
            "imm", Normalizer("imm", tags), SeqCounter(buffer.last_seq()), derive
        )
        task = asyncio.create_task(writer.run())
        for poll in polls:
            await sink([RawReading(t, v) for t, v in poll.items()])
        await writer.stop()
        await task
        records = await buffer.take(1000)
        return [record_samples(r.data) for r in records]
    finally:
        await buffer.close()


async def test_seqs_count_what_leaves_and_records_keep_their_shape(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    polls = [
        {"shots": 1, "p": 10.0, "vib": 0.0},
        {"shots": 1, "p": 10.5, "vib": 1.0},  # p held back
        {"shots": 2, "p": 12.0, "vib": 2.0},  # a cycle; the window closes
        {"shots": 2, "p": 12.2, "vib": 3.0},
    ]
    records = await run_polls(path, polls)
    seqs = [s["seq"] for r in records for s in r]
    assert seqs == list(range(1, len(seqs) + 1))  # no false gap for held-back samples
    tags = [[s["tag"] for s in r] for r in records]
    assert tags == [
        ["shots", "p"],
        ["shots"],
        ["shots", "p"],
        ["shot", "shot.p"],
        ["vib.mean", "vib.good_share"],
        ["shots"],
    ]
    cycle = records[3]
    assert cycle[0]["value"] == 2
    assert cycle[0]["cycle"] == 2
    assert cycle[1]["value"] == 12.0
    assert cycle[1]["unit"] == "bar"
    assert records[4][0]["value"] == 1.0
    assert "window_start" in records[4][0]
    assert state_path(str(path)).exists()


async def test_a_restart_neither_repeats_nor_skips_a_cycle(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    first = await run_polls(
        path, [{"shots": 5, "p": 1.0, "vib": 0.0}, {"shots": 6, "p": 1.0, "vib": 0.0}]
    )
    assert [r[0]["cycle"] for r in first if r[0]["tag"] == "shot"] == [6]
    # Restarted: the counter still shows 6, then moves to 9.
    second = await run_polls(
        path, [{"shots": 6, "p": 2.0, "vib": 0.0}, {"shots": 9, "p": 2.0, "vib": 0.0}]
    )
    new = second[len(first) :]
    heads = [r[0] for r in new if r[0]["tag"] == "shot"]
    assert [h["cycle"] for h in heads] == [9]
    assert heads[0]["missed"] == {"first": 7, "last": 8, "count": 2}
    seqs = [s["seq"] for r in second for s in r]
    assert seqs == sorted(set(seqs))


async def test_a_failing_derive_stage_publishes_the_polls_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: DeviceDerive, samples: list[Any], now: float) -> list[list[Any]]:
        raise RuntimeError("bug in the stage")

    monkeypatch.setattr(DeviceDerive, "process", broken)
    with capture_logs() as logs:
        records = await run_polls(
            tmp_path / "buf.db",
            [{"shots": 1, "p": 10.0, "vib": 0.0}, {"shots": 1, "p": 10.0, "vib": 0.0}],
        )
    assert [[s["tag"] for s in r] for r in records] == [["shots", "p", "vib"]] * 2
    assert [s["seq"] for r in records for s in r] == list(range(1, 7))
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["derive.failed"]


async def test_the_counts_reach_the_metrics(tmp_path: Path) -> None:
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from agent.http.metrics import AgentCollector
    from agent.runtime.pipeline import Agent

    text = CONFIG.replace(
        "agent: {id: gw}", f"agent: {{id: gw}}\nbuffer: {{path: {tmp_path / 'b.db'}}}"
    )
    agent = Agent(parse_config(text, "c.yaml"))
    await agent.buffer.open()
    agent._seq = SeqCounter(agent.buffer.last_seq())  # what run() sets before building
    try:
        built = agent._build_devices(list(parse_config(text, "c.yaml").devices))
        (item,) = built
        assert item.derive is not None
        item.derive.report.suppressed = 5
        agent._start_built(item)
        registry = CollectorRegistry()
        registry.register(AgentCollector(agent.snapshot))
        out = generate_latest(registry).decode()
        assert 'edge_agent_device_derived_total{device="imm",kind="held_back"} 5.0' in out, out
    finally:
        await agent.supervisor.stop_all()
        await agent.driver_context.aclose()
        await agent.buffer.close()


async def test_ticks_go_only_to_devices_with_time_windows(tmp_path: Path) -> None:
    timed = parse_config(CONFIG.replace("length_samples: 3", "length_s: 1"), "c.yaml").devices[0]
    counted = parse_config(CONFIG, "c.yaml").devices[0]
    buffer = SqliteBuffer(BufferConfig(path=str(tmp_path / "b.db")))
    writer = BufferWriter(buffer, lambda *a: None)
    state = DeriveState(None)
    for name, dev in (("a", timed), ("b", counted)):
        tags = list(getattr(dev, "tags", []))
        writer.sink(name, Normalizer(name, tags), SeqCounter(0), DeviceDerive(dev, tags, state))
    await writer.tick()
    assert writer.queue.qsize() == 1
    item = writer.queue.get_nowait()
    assert item is not None
    target, readings, _ = item
    assert target.device == "a"
    assert list(readings) == []
    writer.forget("a", None)  # not that device's stage: kept
    await writer.tick()
    assert writer.queue.qsize() == 1
    writer.forget("a", target.derive)
    writer.queue.get_nowait()
    await writer.tick()
    assert writer.queue.empty()
