"""Prototype measurement: the SQLite buffer's steady-state cycle at modbus-wide rates,
as it is and with the "drained" maintenance rate-limited.

    .venv/bin/python -m bench.proto_buffer_cycle [--cycles 1000]

One cycle = what one poll of one modbus-wide device costs the buffer when the broker
keeps up: append a 1,000-sample batch, take it, commit it (delete after PUBACK). With
the broker keeping up, every commit empties the buffer, and `SqliteBuffer._maintain`
then runs `incremental_vacuum` and `wal_checkpoint(TRUNCATE)` — in modbus-wide that is
up to 100 times a second. The `limited` variant (bench-only monkeypatch) runs that
drained maintenance at most once a second. Prints CPU (all threads) and wall time per
cycle and per value.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from agent.schema import WireSample

N = 1000


def batch(first: int) -> list[WireSample]:
    ts = datetime.now(UTC)
    return [
        {
            "device": "plc00",
            "tag": f"t{i:04d}",
            "value": i * 1.5,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": ts,
            "unit": None,
            "seq": first + i,
        }
        for i in range(N)
    ]


def limit_drained_maintenance(buf: SqliteBuffer, every_s: float) -> None:
    original = buf._maintain
    last = [0.0]

    def maintain(drained: bool) -> None:
        now = time.monotonic()
        if drained and now - last[0] < every_s:
            drained = False
        elif drained:
            last[0] = now
        original(drained)

    buf._maintain = maintain  # type: ignore[method-assign]


async def run(directory: Path, cycles: int, limited: bool) -> tuple[float, float]:
    buf = SqliteBuffer(BufferConfig(path=str(directory / f"b{limited}.db"), max_bytes=1 << 32))
    await buf.open()
    if limited:
        limit_drained_maintenance(buf, 1.0)
    seq = 1
    samples: Any = batch(seq)
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(cycles):
            for i, s in enumerate(samples):
                s["seq"] = seq + i
            seq += N
            await buf.append("plc00", samples)
            records = await buf.take(100)
            await buf.commit([r.id for r in records])
        return time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await buf.close()


async def main(cycles: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-proto-buffer-") as tmp:
        for limited in (False, True):
            wall, cpu = await run(Path(tmp), cycles, limited)
            name = "limited" if limited else "current"
            print(
                f"{name:<8} {cycles / wall:7.0f} cycles/s; per cycle {cpu / cycles * 1e3:.2f} ms "
                f"CPU, {wall / cycles * 1e3:.2f} ms wall; {cpu / (cycles * N) * 1e6:.2f} µs CPU "
                "per value"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SQLite buffer cycle cost")
    parser.add_argument("--cycles", type=int, default=1000)
    asyncio.run(main(parser.parse_args().cycles))
