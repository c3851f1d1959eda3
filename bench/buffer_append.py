"""Append throughput of the SQLite buffer: appends/s and CPU µs per sample, for batches of
1, 100 and 1000 samples, with both durability settings.

    .venv/bin/python bench/buffer_append.py [--dir DIR] [--seconds-per-case 1.5]

Each case appends to a fresh file for a bounded time (the whole run stays under 20 s) and
the records are never committed, as during a broker outage. CPU is process CPU time
(event loop + the buffer's worker thread + SQLite), divided by the samples appended.
Run it on the disk the agent will use (`--dir`): with power_loss every append is an fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from agent.schema import WireSample

Durability = Literal["process_crash", "power_loss"]


def make_batch(n: int) -> list[WireSample]:
    ts = datetime.now(UTC)
    return [
        WireSample(
            device="press1",
            tag=f"line4.press1.tag{i}",
            value=20.5 + i,
            quality="good",
            reason=None,
            code=None,
            ts_source=None,
            ts_agent=ts,
            unit="bar",
            seq=i + 1,
        )
        for i in range(n)
    ]


def remove_files(directory: Path, prefix: str) -> None:
    for p in directory.glob(f"{prefix}*"):
        p.unlink()


async def run_case(
    directory: Path, durability: Durability, batch_size: int, seconds: float
) -> tuple[int, float, float]:
    """Returns (appends, wall seconds, CPU seconds)."""
    path = directory / f"bench-{durability}-{batch_size}.db"
    buf = SqliteBuffer(BufferConfig(path=str(path), durability=durability, max_bytes=1 << 34))
    await buf.open()
    batch = make_batch(batch_size)
    seq = 0
    appends = 0
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        deadline = wall0 + seconds
        while time.perf_counter() < deadline:
            for s in batch:
                seq += 1
                s["seq"] = seq
            await buf.append("press1", batch)
            appends += 1
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await buf.close()
    remove_files(directory, path.name)
    return appends, wall, cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--dir", default=None, help="directory for the files (default: tmp)")
    parser.add_argument("--seconds-per-case", type=float, default=1.5)
    args = parser.parse_args()
    seconds = min(float(args.seconds_per_case), 2.5)  # 6 cases: stay under 20 s
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="buffer-bench-") as tmp:
        print(f"files in {tmp}; {seconds:.1f} s per case")
        print(
            f"{'durability':<14}{'batch':>6}{'appends/s':>12}{'samples/s':>12}{'µs CPU/sample':>15}"
        )
        for durability in ("process_crash", "power_loss"):
            for batch_size in (1, 100, 1000):
                n, wall, cpu = await run_case(Path(tmp), durability, batch_size, seconds)
                samples = n * batch_size
                print(
                    f"{durability:<14}{batch_size:>6}{n / wall:>12,.0f}{samples / wall:>12,.0f}"
                    f"{cpu / samples * 1e6:>15.2f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
