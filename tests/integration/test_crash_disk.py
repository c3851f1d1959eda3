"""The real agent process SIGKILLed mid-stream, and started on a damaged buffer file.

What the subscriber (started first) receives is the truth: every seq from 1 to the last
one the agent produced arrives, and a seq that arrives twice carries the same sample.
"""

from __future__ import annotations

import asyncio
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
from tests.support.samples import make_samples
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
        wait_until(
            lambda: set(range(1, produced + 1)) - left <= identities(sub)[0].keys(),
            10,
            "all delivered seqs at the subscriber",
        )
    seen, conflicts = identities(sub)
    assert conflicts == []
    missing = sorted(set(range(1, produced + 1)) - seen.keys() - left)
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
