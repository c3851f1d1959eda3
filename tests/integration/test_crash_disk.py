"""The real agent process SIGKILLed mid-stream, and started on a damaged buffer file.

What the subscriber (started first) receives is the truth: every seq from 1 to the last
one the agent produced arrives, and a seq that arrives twice carries the same sample.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from tests.support.agent_proc import (
    AgentProcess,
    counter_device,
    last_seq_logged,
    samples_of,
    wait_until,
)
from tests.support.broker import MosquittoBroker, require_mosquitto
from tests.support.samples import make_samples, size_of
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def write_config(tmp: Path, broker: MosquittoBroker, devices: str) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent:
  id: gw-crash
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
{devices}"""
    )
    return path


def identities(sub: Subscriber) -> tuple[dict[int, tuple[str, str, str]], list[str]]:
    """seq -> (device, tag, ts_agent) of every received sample, and the conflicts: a seq
    received twice for different samples (a reused seq)."""
    seen: dict[int, tuple[str, str, str]] = {}
    conflicts: list[str] = []
    for s in samples_of(sub.messages()):
        seq = int(s["seq"])  # type: ignore[call-overload]
        ident = (str(s["device"]), str(s["tag"]), str(s["ts_agent"]))
        if seen.setdefault(seq, ident) != ident:
            conflicts.append(f"seq {seq}: {seen[seq]} and {ident}")
    return seen, conflicts


def announced_gaps(sub: Subscriber) -> tuple[set[int], set[str]]:
    """The seqs of every gap notice received, and their reasons."""
    seqs: set[int] = set()
    reasons: set[str] = set()
    for m in sub.messages():
        body = orjson.loads(m.payload)
        if isinstance(body, dict):
            for g in body.get("gaps", ()):
                seqs.update(range(int(g["first_seq"]), int(g["last_seq"]) + 1))
                reasons.add(str(g["reason"]))
    return seqs, reasons


def new_sample_after(sub: Subscriber, since: float, timeout_s: float) -> float:
    """Seconds from `since` (epoch) until a sample polled after it (ts_agent) arrives:
    the restarted agent publishes new data again."""

    def fresh(_: object) -> bool:
        return any(
            datetime.fromisoformat(str(s["ts_agent"])).timestamp() >= since
            for s in samples_of(sub.messages()[-20:])
        )

    sub.wait_for(fresh, timeout_s)
    return time.time() - since


@pytest.fixture
def persistent_broker() -> Iterator[MosquittoBroker]:
    """A broker that keeps sessions across its restart, so a subscriber with a session
    misses nothing the agent published while the subscriber was reconnecting."""
    broker = MosquittoBroker(persistent=True, binary=require_mosquitto())
    try:
        yield broker.start()
    finally:
        broker.close()


def test_sigkill_mid_stream_loses_nothing_and_never_reuses_a_seq(
    tmp_path: Path, persistent_broker: MosquittoBroker
) -> None:
    broker = persistent_broker
    config = write_config(
        tmp_path, broker, counter_device("press", 0.05) + counter_device("oven", 0.07)
    )
    log = tmp_path / "agent.log"
    resume_s: list[float] = []
    with Subscriber(
        "127.0.0.1", broker.port, "#", client_id="crash-sub", session_expiry_s=600
    ) as sub:
        agent = AgentProcess(log, "run", str(config), "--simulate").start()
        try:
            for round_ in range(4):
                # Mid-stream: at least a few more messages since the last start.
                n = len(sub.messages())
                wait_until(lambda n=n: len(sub.messages()) >= n + 5, 60, "messages", agent)
                if round_ == 3:
                    # Once while the broker is down: what was buffered meanwhile must
                    # come out of the restarted agent.
                    broker.stop()
                    time.sleep(1.0)
                agent.close()  # SIGKILL
                restarted = time.time()
                agent = AgentProcess(log, "run", str(config), "--simulate").start()
                if round_ == 3:
                    time.sleep(1.0)
                    broker.start()
                    sub.wait_subscribed(30)
                # Measured, not asserted (machines are noisy): restart → first publish.
                resume_s.append(round(new_sample_after(sub, restarted, 60), 2))
            n = len(sub.messages())
            wait_until(lambda: len(sub.messages()) >= n + 5, 60, "messages", agent)
            assert agent.terminate() == 0, agent.log()
        finally:
            agent.close()
        produced = last_seq_logged(agent)
        con = sqlite3.connect(tmp_path / "buffer.db")
        try:
            left = {
                q
                for a, b in con.execute("SELECT first_seq, last_seq FROM records")
                for q in range(a, b + 1)
            }
        finally:
            con.close()
        # The last acknowledged messages may still be on their way to the subscriber.
        # After each SIGKILL the agent continues above its seq lease and announces the
        # unused rest of it as a gap (reason skipped).
        wait_until(
            lambda: (
                set(range(1, produced + 1)) - left - announced_gaps(sub)[0]
                <= identities(sub)[0].keys()
            ),
            10,
            "all delivered seqs at the subscriber",
        )
    seen, conflicts = identities(sub)
    assert conflicts == []
    skipped, reasons = announced_gaps(sub)
    assert reasons <= {"skipped"}
    assert not skipped & seen.keys()
    missing = sorted(set(range(1, produced + 1)) - seen.keys() - left - skipped)
    assert missing == [], f"{len(missing)} seqs lost, first {missing[:20]}"
    assert max(seen) <= produced
    print(f"produced {produced}; restart -> first publish (s): {resume_s}")


async def damaged_buffer(tmp_path: Path) -> set[int]:
    """A buffer left behind by an agent that could not deliver, then truncated; returns
    the seqs a salvage keeps (the agent does the same on its own copy)."""
    path = tmp_path / "buffer.db"
    buf = SqliteBuffer(BufferConfig(path=str(path)))
    await buf.open()
    for i in range(60):
        await buf.append("press", make_samples(1 + 10 * i, 10, device="press", pad=(i % 3) * 700))
    await buf.close()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy(path, probe / "buffer.db")
    check = SqliteBuffer(BufferConfig(path=str(probe / "buffer.db")))
    await check.open()
    intact = {q for r in await check.take(1000) for q in range(r.first_seq, r.last_seq + 1)}
    await check.close()
    return intact


def test_agent_starts_on_a_truncated_buffer_and_delivers_what_is_intact(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    intact = asyncio.run(damaged_buffer(tmp_path))
    assert 0 < len(intact) < 600

    config = write_config(tmp_path, broker, counter_device("press", 0.2))
    with (
        Subscriber("127.0.0.1", broker.port, "#") as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(lambda: intact <= identities(sub)[0].keys(), 60, "the intact seqs", agent)
        # New samples continue above everything the damaged file had used.
        wait_until(lambda: max(identities(sub)[0]) > 600, 60, "new samples", agent)
        assert agent.terminate() == 0, agent.log()
    events = [orjson.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    moved = [e for e in events if e.get("event") == "buffer.corrupt.moved_aside"]
    assert len(moved) == 1
    assert moved[0]["recovered_records"] * 10 == len(intact)
    assert any(p.name.startswith("buffer.db.corrupt-") for p in tmp_path.iterdir())
    new = sorted(q for q in identities(sub)[0] if q > 600)
    assert new[0] == 601


def wide_device(name: str, interval_s: float, tags: int, simulate: str = "") -> str:
    extra = f", simulate: {simulate}" if simulate else ""
    lines = "".join(
        f"      - {{name: t{i}, address: {i}, type: uint16{extra}}}\n" for i in range(tags)
    )
    return f"""\
  - name: {name}
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: {interval_s}
    tags:
{lines}"""


def scribble(path: Path, at: float, length: int) -> None:
    """Overwrite `length` bytes at fraction `at` of the file with garbage (a bad sector,
    a stray write), under the running agent."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(int(size * at) // 4096 * 4096)
        f.write(os.urandom(min(length, size // 4)))


@pytest.mark.timeout(420)  # 1.4 million values make a 3 MiB backlog, all delivered after
def test_buffer_damaged_while_running_is_salvaged_and_delivery_goes_on(
    tmp_path: Path, persistent_broker: MosquittoBroker
) -> None:
    broker = persistent_broker
    # Values the record format cannot compress (random uint16s): 2 bytes each on disk.
    noise = "{generator: random_walk, min: 0, max: 65535, step: 30000}"
    config = write_config(tmp_path, broker, wide_device("press", 0.1, 2000, noise))
    db, wal = tmp_path / "buffer.db", tmp_path / "buffer.db-wal"
    with (
        Subscriber(
            "127.0.0.1", broker.port, "#", client_id="damage-sub", session_expiry_s=600
        ) as sub,
        AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
    ):
        wait_until(lambda: len(sub.messages()) >= 5, 60, "messages", agent)
        # A backlog larger than SQLite's page cache (2,000 KiB), so that delivering it
        # reads the disk.
        broker.stop()
        # ≈ 20,000 values/s at 2.2 bytes each: about 70 s, more on a loaded machine.
        wait_until(lambda: size_of(db) > 3 << 20, 150, "a backlog", agent)
        for path in (db, wal):
            if size_of(path) > 1 << 20:
                # In the first third: pages the cache (the newest ~2,000) no longer holds.
                for at in (0.05, 0.15, 0.25):
                    scribble(path, at, 128 << 10)
        damaged_at = time.time()
        broker.start()
        sub.wait_subscribed(30)

        def salvaged() -> bool:
            return '"buffer.corrupt.moved_aside"' in agent.log()

        wait_until(salvaged, 60, "the salvage of the damaged file", agent)
        # Delivery goes on: samples polled after the damage arrive.
        new_sample_after(sub, damaged_at, 60)
        assert agent.terminate() == 0, agent.log()
        produced = last_seq_logged(agent)
        con = sqlite3.connect(db)
        try:
            left = {
                q
                for a, b in con.execute("SELECT first_seq, last_seq FROM records")
                for q in range(a, b + 1)
            }
        finally:
            con.close()
        # The last acknowledged messages may still be on their way to the subscriber.
        wait_until(
            lambda: (
                set(range(1, produced + 1)) - left - announced_gaps(sub)[0]
                <= identities(sub)[0].keys()
            ),
            10,
            "all delivered seqs at the subscriber",
        )
    events = [orjson.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    moved = [e for e in events if e.get("event") == "buffer.corrupt.moved_aside"]
    assert len(moved) == 1, moved
    assert moved[0]["at_start"] is False
    assert moved[0]["level"] == "error"
    assert not [e for e in events if e.get("event") in ("agent.failed", "buffer.append.failed")]
    assert any(p.name.startswith("buffer.db.damaged-") for p in tmp_path.iterdir())
    seen, conflicts = identities(sub)
    assert conflicts == []
    # Nothing is lost silently: every seq arrived, is still buffered, or was announced
    # as lost in the damaged file.
    lost, reasons = announced_gaps(sub)
    assert "corrupt" in reasons
    assert reasons <= {"corrupt", "skipped"}
    missing = sorted(set(range(1, produced + 1)) - seen.keys() - left - lost)
    assert missing == [], f"{len(missing)} seqs lost silently, first {missing[:20]}"
    print(
        f"produced {produced}; delivered {len(seen)}; announced lost {len(lost)}; "
        f"salvage: {moved[0]['recovered_records']} records kept, "
        f"{moved[0]['lost_samples']} samples lost"
    )
