"""Every boundary of the pipeline, one fault at a time: delivery resumes (or the agent
exits loudly), and no sample the buffer accepted is lost.

The agent runs in-process with two devices of the fake protocol (drivers/fake), the real
SQLite buffer in a temporary directory and the fake publisher (an MQTT broker is no part
of these boundaries; tests/integration/test_poison_e2e.py and test_link_outages.py put
the real broker under fault). A fault is injected with tests/support/faults.py at one
boundary — the buffer (append, take, commit), the publisher, the payload encoder, a
driver — and is one of: an unexpected exception, a call that never returns, or garbage
returned. After the fault the test waits for fresh deliveries from both devices, stops
the agent (whose drain delivers what is left) and checks the books:

    every seq the buffer accepted = published  +  set aside as a dead letter (announced
    as a gap)  +  still buffered

Seqs handed out for a poll the buffer never accepted are allowed only where the outcome
says so, and are counted (`samples_dropped_on_error`). The table in MATRIX is the
closing note's fault-injection matrix: boundary × fault → outcome.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.buffer.sqlite import SqliteBuffer
from agent.config import Config, parse_config
from agent.publish import Message
from agent.publish.fake import FakePublisher
from agent.runtime import Agent, SupervisionPolicy, TaskFailed
from agent.simulate import simulators
from drivers import registry
from drivers.fake import FakeBench
from tests.support.faults import Fault, FaultPlan, Faulty, Garbage, Hang, Raise
from tests.support.payloads import decoded, samples

pytestmark = pytest.mark.integration

FAST = SupervisionPolicy(max_failures=4, window_s=60.0, backoff_min_s=0.02, backoff_max_s=0.05)


def data(messages: Sequence[Message]) -> bool:
    """A forwarder's round (data topics), not a status message."""
    return any(m.topic.startswith("edge/") for m in messages)


@dataclass(frozen=True)
class Case:
    boundary: str  # buffer | publisher | encoder | driver
    method: str
    fault: Fault
    times: int | None
    outcome: str  # what must happen, in words (the matrix)
    when: Callable[..., bool] | None = None
    #: seqs handed out but never accepted by the buffer are allowed (and counted)
    unaccepted_ok: bool = False
    dead_letters: bool | None = False  # the fault sets records aside (None: it may)
    fatal: bool = False  # the agent must exit loudly instead of resuming
    delivering: frozenset[str] = frozenset({"a", "b"})  # devices that must deliver after it


MATRIX = [
    Case(
        "buffer",
        "append_many",
        Raise(OSError(5, "Input/output error")),
        3,
        "writer keeps the polls and retries; nothing dropped",
    ),
    Case(
        "buffer",
        "append_many",
        Raise(RuntimeError("bug in the store")),
        2,
        "writer keeps the polls and retries; nothing dropped",
    ),
    Case(
        "buffer",
        "append_many",
        Garbage(lambda r: [], "wrong result count"),
        1,
        "writer restarted; the polls in hand counted as dropped",
        unaccepted_ok=True,
    ),
    Case(
        "buffer",
        "take",
        Raise(OSError(5, "Input/output error")),
        2,
        "forwarder restarted; delivery resumes",
    ),
    Case("buffer", "take", Hang(), 1, "forwarder stalled, restarted; delivery resumes"),
    Case(
        "buffer",
        "take",
        Garbage(lambda r: [*r, *r], "records twice"),
        2,
        "duplicates at most; delivery resumes",
    ),
    Case(
        "buffer",
        "commit",
        Raise(OSError(28, "No space left on device")),
        2,
        "forwarder restarted; records sent again (duplicates), none lost",
    ),
    Case(
        "publisher",
        "publish",
        Raise(RuntimeError("bug in the client")),
        2,
        "forwarder restarted; delivery resumes",
        when=data,
    ),
    Case(
        "publisher",
        "publish",
        Hang(),
        1,
        "forwarder stalled, restarted; delivery resumes",
        when=data,
    ),
    Case(
        "publisher",
        "publish",
        Garbage(lambda r: r[:-1], "one result short"),
        2,
        "forwarder restarted; delivery resumes",
        when=data,
    ),
    Case(
        "publisher",
        "publish",
        Raise(RuntimeError("client broken for good")),
        None,
        "forwarder keeps failing: the agent exits 1 naming it",
        when=data,
        fatal=True,
    ),
    Case(
        "encoder",
        "encode",
        Raise(ValueError("cannot encode")),
        1,
        "record split and encoded again in parts (one of a single sample: set aside)",
        dead_letters=None,
    ),
    Case(
        "encoder",
        "encode",
        Raise(ValueError("device a cannot be encoded")),
        None,
        "device a's samples set aside as dead letters, announced as a gap; b flows",
        when=lambda record, **_: record.device == "a",
        dead_letters=True,
        delivering=frozenset({"b"}),
    ),
    Case(
        "encoder",
        "encode",
        Garbage(lambda r: [], "no messages"),
        None,
        "device a's samples set aside as dead letters (never deleted as if sent), "
        "announced as a gap; b flows",
        when=lambda record, **_: record.device == "a",
        dead_letters=True,
        delivering=frozenset({"b"}),
    ),
    Case(
        "driver",
        "read",
        Raise(KeyError("bug in a driver")),
        2,
        "poll reported bad or poller restarted; the device resumes",
    ),
    Case("driver", "read", Hang(), 1, "poll guard ends it, bad sample; the device resumes"),
]


def config_text(tmp: Path) -> str:
    return f"""\
agent: {{id: gw-faults}}
buffer: {{path: {tmp / "buffer.db"}}}
mqtt: {{publish_timeout_s: 0.5}}
supervision: {{stall_s: 0.6}}
devices:
  - name: a
    protocol: fake
    endpoint: fake://plc
    interval_s: 0.02
    timeout_s: 0.05
    retries: 0
    backoff_min_s: 0.05
    backoff_max_s: 0.1
    down_report_interval_s: 0.05
    tags:
      - {{name: x, simulate: {{generator: ramp, min: 0, max: 100, period_s: 5}}}}
      - {{name: y, type: int, simulate: {{generator: counter, step: 1, period_s: 0.1}}}}
  - name: b
    protocol: fake
    endpoint: fake://plc
    interval_s: 0.02
    tags:
      - {{name: z, simulate: {{generator: sine, min: 0, max: 1, period_s: 3}}}}
"""


@pytest.fixture
def bench() -> Iterator[FakeBench]:
    bench = FakeBench()
    with registry.registered(bench.protocol()):
        yield bench


def published(pub: FakePublisher) -> tuple[dict[int, str], set[int]]:
    """seq → device of every sample published, and the seqs announced as dead letters."""
    seqs: dict[int, str] = {}
    dead: set[int] = set()
    for m in pub.published:
        if not m.topic.startswith("edge/"):
            continue
        [d] = decoded([m])
        for s in d.samples:
            seqs[int(s["seq"])] = str(s["device"])
        for g in d.gaps:
            if g["reason"] == "dead_letter":
                dead.update(range(int(g["first_seq"]), int(g["last_seq"]) + 1))
    return seqs, dead


async def wait_for(cond: Callable[[], Any], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "case", MATRIX, ids=[f"{c.boundary}.{c.method}-{c.fault.describe()}" for c in MATRIX]
)
async def test_one_fault_at_one_boundary(tmp_path: Path, bench: FakeBench, case: Case) -> None:
    config: Config = parse_config(config_text(tmp_path))
    plan = FaultPlan().at(case.method, 1, case.fault, times=case.times, when=case.when)
    inner_buffer = SqliteBuffer(config.buffer)
    publisher = FakePublisher()
    buffer: Any = Faulty(inner_buffer, plan) if case.boundary == "buffer" else inner_buffer
    pub: Any = Faulty(publisher, plan) if case.boundary == "publisher" else publisher
    if case.boundary == "driver":
        script = bench.script("a")
        for _ in range(case.times or 1):
            if isinstance(case.fault, Raise):
                script.read(error=case.fault.exc)  # type: ignore[arg-type]
            else:
                script.read(hang_s=math.inf)
    async with simulators(config) as simulated:
        agent = Agent(
            simulated,
            publisher=pub,
            buffer=buffer,
            grace_s=3.0,
            health_interval_s=0.05,
            supervision=FAST,
        )
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.forwarder is not None or task.done())
            if case.boundary == "encoder" and agent.forwarder is not None:
                agent.forwarder.encoder = Faulty(agent.forwarder.encoder, plan)  # type: ignore[assignment]
            if case.fatal:
                with pytest.raises(TaskFailed) as info:
                    async with asyncio.timeout(60):
                        await task
                assert info.value.task == "forwarder"
                assert plan.fired
                return
            # The fault goes off, then both devices deliver fresh samples after it.
            if case.boundary == "driver":
                await wait_for(lambda: not script.pending)
            else:
                await wait_for(lambda: bool(plan.fired))
            mark = len(publisher.published)
            await wait_for(
                lambda: published_after(publisher, mark) >= case.delivering, timeout_s=40
            )
            if case.dead_letters:  # the notice rides on a later message of a later round
                await wait_for(lambda: bool(published(publisher)[1]), timeout_s=40)
        finally:
            agent.stop()
            if not task.done() or not case.fatal:
                await asyncio.wait_for(task, 60)
    if case.boundary != "driver":
        assert plan.fired, "the fault was never injected"
    seqs, dead = published(publisher)
    # Set aside but not announced yet (its notice rides on a later message): the store.
    dead |= set_aside(config)
    stats = inner_buffer.stats()
    accepted_high = stats.last_seq
    still = await still_buffered(config)
    missing = set(range(1, accepted_high + 1)) - set(seqs) - dead - still
    unaccepted = agent.status.samples_dropped_on_error
    if case.unaccepted_ok:
        assert len(missing) <= unaccepted, (len(missing), unaccepted)
    else:
        assert unaccepted == 0
        assert missing == set(), sorted(missing)[:20]
    if case.dead_letters:
        assert dead, "a record set aside must be announced as a gap"
        assert agent.forwarder is not None
        assert agent.forwarder.stats.dead_lettered_records >= 1
    elif case.dead_letters is not None:
        assert dead == set()
    assert agent.supervisor.failure is None


def published_after(pub: FakePublisher, mark: int) -> set[str]:
    devices: set[str] = set()
    for m in pub.published[mark:]:
        if m.topic.startswith("edge/"):
            devices.update(str(s["device"]) for s in samples([m]))
    return devices


def set_aside(config: Config) -> set[int]:
    """Seqs of the records in the dead-letter store beside the buffer file."""
    path = Path(f"{config.buffer.path}.deadletter.sqlite")
    if not path.exists():
        return set()
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT first_seq, last_seq FROM dead_letters").fetchall()
    finally:
        con.close()
    return {q for a, b in rows for q in range(int(a), int(b) + 1)}


async def still_buffered(config: Config) -> set[int]:
    """Seqs of the records left in the (closed) buffer file."""
    buffer = SqliteBuffer(config.buffer)
    await buffer.open()
    try:
        records = await buffer.take(100_000)
    finally:
        await buffer.close()
    return {q for r in records for q in range(r.first_seq, r.last_seq + 1)}
