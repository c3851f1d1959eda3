"""A process appending to the real SqliteBuffer is SIGKILLed mid-stream: every append it
reported as returned must be in the file afterwards, and the seq high-water must cover it.
After the kill the buffer continues above its seq lease, in the same epoch, and reports
the unused rest of the lease as a gap (reason skipped).

The child prints a line only after `append` returned, so what the parent read is a lower
bound of what the buffer promised; the buffer may hold more (an append that completed
just before the kill, with its line not yet written), never less.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from pathlib import Path
from typing import Literal

import pytest

from agent.buffer.sqlite import LEASE_BLOCK, SqliteBuffer
from agent.config import BufferConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig

async def main(path: str, durability: str, commit: bool) -> None:
    buf = SqliteBuffer(BufferConfig(path=path, durability=durability))
    await buf.open()
    seq = buf.last_seq()
    print("ready", seq, flush=True)
    ts = datetime.now(UTC)
    while True:
        n = 1 + seq % 40
        samples = [
            {"device": "press1", "tag": f"t{i}", "value": float(i), "quality": "good",
             "reason": None, "code": None, "ts_source": None, "ts_agent": ts,
             "unit": None, "seq": seq + 1 + i}
            for i in range(n)
        ]
        await buf.append("press1", samples)
        print("appended", seq + 1, seq + n, flush=True)
        seq += n
        if commit:
            recs = await buf.take(100)
            await buf.commit([r.id for r in recs])
            print("committed", recs[-1].last_seq, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1"))
"""


async def run_and_kill(
    path: Path, durability: str, commit: bool, appends: int
) -> tuple[int, list[tuple[int, int]]]:
    """Start the child, let it report `appends` appends, SIGKILL it; returns the seq it
    started from and every (first_seq, last_seq) it reported."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        durability,
        "1" if commit else "0",
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    reported: list[tuple[int, int]] = []
    try:
        async with asyncio.timeout(60):
            ready = (await proc.stdout.readline()).split()
            assert ready[:1] == [b"ready"], (ready, await proc.stderr.read())  # type: ignore[union-attr]
            start = int(ready[1])
            while len(reported) < appends:
                line = await proc.stdout.readline()
                assert line, await proc.stderr.read()  # type: ignore[union-attr]
                if line.startswith(b"appended"):
                    _, a, b = line.split()
                    reported.append((int(a), int(b)))
        proc.send_signal(signal.SIGKILL)
        # Lines already in the pipe were also reported before the kill; a torn last line
        # (no newline) is not a report.
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        for line in rest.splitlines(keepends=True):
            if line.startswith(b"appended") and line.endswith(b"\n"):
                _, a, b = line.split()
                reported.append((int(a), int(b)))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return start, reported


@pytest.mark.parametrize("durability", ["process_crash", "power_loss"])
async def test_sigkill_loses_no_reported_append(
    tmp_path: Path, durability: Literal["process_crash", "power_loss"]
) -> None:
    path = tmp_path / "data" / "buf.db"
    reported: list[tuple[int, int]] = []
    high_water = 0
    epochs: set[str] = set()
    # Two rounds on the same file: the second starts from the recovered high-water mark.
    for _ in range(2):
        start, got = await run_and_kill(path, durability, commit=False, appends=300)
        assert start == high_water
        reported += got
        buf = SqliteBuffer(BufferConfig(path=str(path), durability=durability))
        await buf.open()
        try:
            epochs.add(buf.epoch)
            stored = {(r.first_seq, r.last_seq): r for r in await buf.take(1_000_000)}
            missing = [rng for rng in reported if rng not in stored]
            assert missing == []
            for (first, last), rec in stored.items():
                assert rec.count == last - first + 1
                assert rec.epoch == buf.epoch
            # Records are whole, and with the skipped rests of the leases contiguous from
            # seq 1; anything beyond the reports is an append that returned just before
            # the kill, its line lost with the process.
            ranges = sorted(stored)
            gaps = await buf.take_gaps()
            assert {g.reason for g in gaps} == {"skipped"}
            assert ranges[0][0] == 1
            assert [r.first_seq for r in stored.values()] == [a for a, _ in ranges]  # id order
            spans = sorted(ranges + [(g.first_seq, g.last_seq) for g in gaps])
            assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(spans))
            high_water = buf.last_seq()
            assert high_water >= reported[-1][1]
            # Above the newest record: the lease (at most one block plus one batch).
            assert spans[-1][1] == high_water
            assert high_water - ranges[-1][1] <= LEASE_BLOCK + 40
        finally:
            await buf.close()
    assert len(epochs) == 1


async def test_sigkill_keeps_high_water_after_everything_was_committed(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    _, reported = await run_and_kill(path, "process_crash", commit=True, appends=300)
    buf = SqliteBuffer(BufferConfig(path=str(path)))
    await buf.open()
    try:
        assert buf.last_seq() >= reported[-1][1]
        gaps = await buf.take_gaps()
        assert [g.reason for g in gaps] == ["skipped"]
        assert gaps[0].first_seq <= reported[-1][1] + 1
        # Whatever was not committed before the kill is still there, and nothing older.
        remaining = await buf.take(1000)
        assert len(remaining) <= 1
        for rec in remaining:
            assert rec.first_seq >= reported[-1][0]
    finally:
        await buf.close()
