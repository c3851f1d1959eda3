"""What the durable seq lease costs the buffer (agent/buffer/sqlite.py).

Prints the time of one lease (write `<path>.seq` in place + fdatasync) on the disk that
holds --dir, and the append throughput of the real SqliteBuffer with 1,000-sample
batches, with the default lease block and with leasing practically off (one lease for
the whole run), so the difference is the leases' share.

    .venv/bin/python bench/buffer_lease.py                 # in a temporary directory
    .venv/bin/python bench/buffer_lease.py --dir /var/lib/edge-agent --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import agent.buffer.sqlite as sqlite_mod
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from agent.schema import WireSample


def make_batch(first: int, n: int) -> list[WireSample]:
    ts = datetime.now(UTC)
    return [
        WireSample(
            device="press1",
            tag=f"t{i}",
            value=float(i),
            quality="good",
            reason=None,
            code=None,
            ts_source=None,
            ts_agent=ts,
            unit=None,
            seq=first + i,
        )
        for i in range(n)
    ]


async def lease_times(directory: Path, n: int) -> list[float]:
    buf = SqliteBuffer(BufferConfig(path=str(directory / "lease.db")))
    await buf.open()
    try:

        def run() -> list[float]:
            out = []
            for i in range(n):
                t = time.perf_counter()
                assert buf._write_lease(10_000 * (i + 1))
                out.append(time.perf_counter() - t)
            return out

        return await buf._run(run)
    finally:
        await buf.close()


async def throughput(directory: Path, block: int, seconds: float, batch: int) -> tuple[float, int]:
    sqlite_mod.LEASE_BLOCK = block
    path = directory / f"tp-{block}.db"
    buf = SqliteBuffer(BufferConfig(path=str(path), max_bytes=4 << 30))
    await buf.open()
    try:
        seq = 1
        leases0 = buf._leases
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await buf.append("press1", make_batch(seq, batch))
            seq += batch
            if seq % (batch * 50) == 1:  # keep the file small: deliver as we go
                await buf.commit([r.id for r in await buf.take(10_000)])
        elapsed = time.perf_counter() - start
        return (seq - 1) / elapsed, buf._leases - leases0
    finally:
        await buf.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        times = await lease_times(directory, 200)
        mean = statistics.mean(times)
        p99 = sorted(times)[int(len(times) * 0.99) - 1]
        block = sqlite_mod.LEASE_BLOCK
        print(f"disk: {directory} (fs {os.statvfs(directory).f_fsid:x})")
        print(f"one lease (pwrite + fdatasync): mean {mean * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
        per_s = 100_000 / block
        print(
            f"at 100,000 values/s with {block:,}-seq blocks: {per_s:g} leases/s, "
            f"≈ {per_s * mean * 1e3:.1f} ms of the buffer thread per second "
            f"({per_s * mean * 100:.2f} %)"
        )
        with_leases, n = await throughput(directory, block, args.seconds, args.batch)
        without, _ = await throughput(directory, 10**15, args.seconds, args.batch)
        print(
            f"append throughput, {args.batch}-sample batches: {with_leases:,.0f} values/s "
            f"with {block:,}-seq leases ({n} leases), {without:,.0f} values/s with one lease"
        )


if __name__ == "__main__":
    asyncio.run(main())
