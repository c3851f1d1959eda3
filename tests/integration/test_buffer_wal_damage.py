"""The WAL overwritten under a running agent's buffer (a bad sector, 16 KiB of noise in
the middle of `-wal`, as the soak does), then the process is SIGKILLed or closes cleanly:
after the next open every seq it appended is either still buffered or announced as a gap.

SQLite replays a WAL only up to its first frame with a bad checksum and drops the committed
transactions after it without an error; the buffer's seq high-water, the durable seq lease
and the salvage of a file that fails its check are what keep such a loss visible. The
writer runs in a child process so that a real SIGKILL ends it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig

ROOT = Path(__file__).resolve().parents[2]
PER_RECORD = 10
BEFORE, AFTER = 300, 200

CHILD = f"""
import asyncio, sys
sys.path.insert(0, {str(ROOT)!r})
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import make_samples

async def main(path, end):
    buf = SqliteBuffer(BufferConfig(path=path))
    await buf.open()
    seq = buf.last_seq()
    for i in range({BEFORE} + {AFTER}):
        if i == {BEFORE}:
            print("ready", flush=True)
            sys.stdin.readline()  # the parent damages the WAL now
        await buf.append("d", make_samples(seq + 1, {PER_RECORD}, device="d", pad=(i % 3) * 300))
        seq += {PER_RECORD}
        if i % 50 == 0:
            await buf.take(10)  # reads, as the forwarder's, meet the damage
    if end == "close":
        await buf.close()
    print("done", seq, flush=True)
    sys.stdin.readline()  # wait for the SIGKILL (or the end of the test)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def scribble(path: Path, seed: int, length: int = 16 * 1024) -> None:
    rng = random.Random(seed)
    size = path.stat().st_size
    start = max(4096, rng.randrange(size // 4, 3 * size // 4) // 4096 * 4096)
    with path.open("r+b") as f:
        f.seek(start)
        f.write(rng.randbytes(min(length, size - start)))


async def coverage(path: Path, top: int) -> tuple[list[int], int, set[str]]:
    buf = SqliteBuffer(BufferConfig(path=str(path)))
    await buf.open()
    try:
        records = await buf.take(100_000)
        gaps = await buf.take_gaps()
    finally:
        await buf.close()
    have = {q for r in records for q in range(r.first_seq, r.last_seq + 1)}
    announced = {q for g in gaps for q in range(g.first_seq, g.last_seq + 1)}
    missing = [q for q in range(1, top + 1) if q not in have and q not in announced]
    return missing, len(have), {g.reason for g in gaps}


@pytest.mark.parametrize("end", ["sigkill", "close"])
@pytest.mark.parametrize("seed", [0, 3, 4, 5])
async def test_every_seq_survives_or_is_announced(tmp_path: Path, end: str, seed: int) -> None:
    path = tmp_path / "buf.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        end,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).startswith(b"ready")
        scribble(Path(f"{path}-wal"), seed)
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"done"), line
        top = int(line.split()[1])
        assert top == PER_RECORD * (BEFORE + AFTER)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    missing, kept, reasons = await coverage(path, top)
    assert missing == [], f"{len(missing)} seqs neither kept nor announced ({kept} kept)"
    if kept < top:
        # The damage was found (at the latest when the file was opened again): what reads
        # back whole is kept, the rest is announced as corrupt — not the whole backlog.
        assert "corrupt" in reasons, reasons
        assert kept >= top * 9 // 10, f"only {kept} of {top} seqs salvaged"
