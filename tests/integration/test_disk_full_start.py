"""The real SqliteBuffer on a real full file system (a 1 MiB tmpfs) at start: it stays up
degraded, and recovers with the records on disk once space is freed. Skipped where
mounting is not permitted (not root, or a container without CAP_SYS_ADMIN)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from tests.support.samples import make_samples


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    block = b"\0" * 4096
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass  # ENOSPC: the file system is full
    return filler


async def test_full_disk_at_start_stays_up_and_recovers(small_fs: Path) -> None:
    cfg = BufferConfig.model_validate({"path": str(small_fs / "buf.db")})
    buf = SqliteBuffer(cfg)
    await buf.open()
    await buf.append("press1", make_samples(1, 5))
    await buf.close()
    filler = await asyncio.to_thread(fill, small_fs)

    buf = SqliteBuffer(cfg)
    await buf.open()  # used to raise "database or disk is full"
    try:
        stats = buf.stats()
        assert stats.degraded
        assert stats.health == "degraded"
        assert buf.last_seq() == 5
        await buf.append("press1", make_samples(6, 3))
        assert [(r.first_seq, r.last_seq) for r in await buf.take(10)] == [(1, 5), (6, 8)]
        buf._next_probe = 0.0
        await buf.append("press1", make_samples(9, 1))
        assert buf.stats().degraded  # still full

        await asyncio.to_thread(filler.unlink)
        buf._next_probe = 0.0  # probe now rather than in PROBE_INTERVAL_S
        await buf.append("press1", make_samples(10, 2))
        assert not buf.stats().degraded
        assert buf.stats().memory_records == 0
    finally:
        await buf.close()

    buf = SqliteBuffer(cfg)
    await buf.open()
    try:
        taken = await buf.take(10)
        assert [(r.first_seq, r.last_seq) for r in taken] == [(1, 5), (6, 8), (9, 9), (10, 11)]
        assert [r.id for r in taken] == sorted(r.id for r in taken)
        assert buf.last_seq() == 11
    finally:
        await buf.close()
