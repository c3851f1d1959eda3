"""Buffer record format: bytes per value on disk, bytes written per value, CPU per value,
format 2 (the JSON array of samples) and format 3 (columnar, checked) in the same run.

    .venv/bin/python -m bench.record_format [--dir DIR] [--polls N]

Workloads (one device, 100 ms polls; values change from poll to poll like a live line):
- ``counters``: 1,000 uint16 counters (each counts up at its own rate);
- ``mixed``: 1,000 tags in the agent bench's Modbus pattern (bench/scenarios.py: 5 int16,
  3 float32, 2 int32 per 10 tags) carrying noisy process values, 1 % of them bad;
- ``small``: 10 tags of the same mix (a small device: per-record costs dominate).

Part 1, the codec alone: encoded bytes per value and CPU per value of encode and decode
(`record_samples`) for format 2 and format 3 with no compression, zlib (levels 1 and 6)
and zstd (levels 1 and 3; measured on the same payloads through the `zstandard` package
when it is installed — the agent does not depend on it).

Part 2, the real `SqliteBuffer` (durability process_crash) on a file in DIR: the file's
bytes per value (the database after the appends and the checkpoint of close; the WAL
comes on top, at most ~4 MiB whatever the backlog: its peak is shown), what counts
against ``max_bytes`` per value, the hours of 10,000 values/s one GiB of file holds, the
bytes written per value (``wchar`` of /proc/self/io: every write(2) of the process to the
database, its WAL — checkpoints included — and the lease file; ``write_bytes``, what reached
the block layer, is shown too), and CPU per value of append and of take + commit. Format 2
is the same buffer storing each record as format 2 did (the JSON array, no dictionary).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import random
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from agent.buffer.common import record_samples
from agent.buffer.record import EncodedBatch, RecordEncoder, check_seqs
from agent.buffer.sqlite import SqliteBuffer
from agent.config import BufferConfig
from agent.schema import WireSample

OPTS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
PATTERN: tuple[str, ...] = ("int16", "float32", "int16", "int32", "int16", "float32")
PATTERN += ("int16", "float32", "int16", "int32")
GIB = 1 << 30


def _f32(x: float) -> float:
    import struct

    return float(struct.unpack("<f", struct.pack("<f", x))[0])


@dataclass
class Workload:
    name: str
    tags: list[str]
    units: Sequence[str | None]
    poll: Callable[[int], list[Any]]  # poll number -> values (None = bad)


def counters(n: int = 1000) -> Workload:
    rng = random.Random(1)
    base = [rng.randrange(65536) for _ in range(n)]
    rate = [rng.choice((0, 0, 1, 1, 2, 5, 17)) for _ in range(n)]
    return Workload(
        "counters",
        [f"line4.counter{i:04d}" for i in range(n)],
        ["pcs"] * n,
        lambda k: [(b + r * k) % 65536 for b, r in zip(base, rate, strict=True)],
    )


def mixed(n: int = 1000, name: str = "mixed") -> Workload:
    rng = random.Random(2)
    kinds = [PATTERN[i % len(PATTERN)] for i in range(n)]
    phase = [rng.random() * 6.28 for _ in range(n)]
    walk = [rng.randrange(-100_000, 100_000) for _ in range(n)]
    units = [{"int16": "bar", "float32": "°C", "int32": "mm"}[k] for k in kinds]

    def poll(k: int) -> list[Any]:
        out: list[Any] = []
        for i, kind in enumerate(kinds):
            if rng.random() < 0.01:
                out.append(None)
                continue
            wave = math.sin(k / 50 + phase[i])
            if kind == "int16":
                out.append(int(800 * wave) + rng.randrange(-3, 4))
            elif kind == "float32":
                out.append(_f32(60 + 15 * wave + rng.gauss(0, 0.05)))
            else:
                walk[i] += rng.randrange(-40, 41)
                out.append(walk[i])
        return out

    return Workload(name, [f"line4.press.{k}.{i:04d}" for i, k in enumerate(kinds)], units, poll)


def batches(w: Workload, polls: int, device: str = "press1") -> Iterator[list[WireSample]]:
    seq = 0
    t0 = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    for k in range(polls):
        ts = t0 + timedelta(milliseconds=100 * k)
        out: list[WireSample] = []
        for tag, unit, v in zip(w.tags, w.units, w.poll(k), strict=True):
            seq += 1
            s: WireSample = {
                "device": device,
                "tag": tag,
                "value": v,
                "quality": "good" if v is not None else "bad",
                "reason": None if v is not None else "timeout",
                "code": None,
                "ts_source": None,
                "ts_agent": ts,
                "unit": unit,
                "seq": seq,
            }
            out.append(s)
        yield out


class Format2Encoder:
    """Records as format 2 stored them: the JSON array of samples."""

    def encode(self, samples: Sequence[WireSample], last_seq: int) -> EncodedBatch:
        first, last, _ = check_seqs(samples, last_seq)
        return EncodedBatch(first, last, len(samples), orjson.dumps(samples, option=OPTS))


def _body_of(enc: RecordEncoder) -> Callable[[list[WireSample]], bytes]:
    return lambda b: enc.encode(b, 0).data


def codec_part(w: Workload, polls: int) -> None:
    data = list(batches(w, polls))
    values = sum(len(b) for b in data)
    rows: list[tuple[str, float, float, float]] = []

    def measure(label: str, enc: Callable[[list[WireSample]], bytes], dec: Any) -> None:
        c0 = time.process_time()
        blobs = [enc(b) for b in data]
        c1 = time.process_time()
        if dec is not None:
            for blob in blobs:
                dec(blob)
        c2 = time.process_time()
        size = sum(map(len, blobs))
        dec_us = (c2 - c1) / values * 1e6 if dec is not None else float("nan")
        rows.append((label, size / values, (c1 - c0) / values * 1e6, dec_us))

    measure(
        "format 2 (JSON)",
        lambda b: orjson.dumps(b, option=OPTS),
        record_samples,
    )
    for comp in ("none", "zlib"):
        enc = RecordEncoder(comp)
        # Each record's body (the dictionary is stored once per device, not per record).
        measure(f"format 3, {comp}", _body_of(enc), None)
    # Payload-level comparison of compressors on the uncompressed format-3 bodies.
    plain = RecordEncoder("none")
    bodies = [plain.encode(b, 0).data for b in data]
    for level in (1, 6):
        c0 = time.process_time()
        packed = [zlib.compress(b[32:-4], level) for b in bodies]
        c1 = time.process_time()
        for p in packed:
            zlib.decompress(p)
        c2 = time.process_time()
        size = sum(min(len(p), len(b) - 36) + 36 for p, b in zip(packed, bodies, strict=True))
        enc_us, dec_us = (c1 - c0) / values * 1e6, (c2 - c1) / values * 1e6
        rows.append((f"  zlib {level} alone", size / values, enc_us, dec_us))
    try:
        # Optional (`pip install zstandard`): not a dependency of the agent.
        zstandard: Any = importlib.import_module("zstandard")
    except ImportError:
        rows.append(("  zstd (not installed)", float("nan"), float("nan"), float("nan")))
    else:
        for level in (1, 3):
            cctx = zstandard.ZstdCompressor(level=level)
            dctx = zstandard.ZstdDecompressor()
            c0 = time.process_time()
            packed = [cctx.compress(b[32:-4]) for b in bodies]
            c1 = time.process_time()
            for p in packed:
                dctx.decompress(p)
            c2 = time.process_time()
            size = sum(min(len(p), len(b) - 36) + 36 for p, b in zip(packed, bodies, strict=True))
            rows.append(
                (
                    f"  zstd {level} alone",
                    size / values,
                    (c1 - c0) / values * 1e6,
                    (c2 - c1) / values * 1e6,
                )
            )
    # Decode of the chosen format-3 form, whole records as readers get them.
    zenc = RecordEncoder("zlib")
    full = [zenc.encode(b, 0).full for b in data]
    c0 = time.process_time()
    for f in full:
        record_samples(f)
    c1 = time.process_time()
    nan = float("nan")
    rows.append(("  format 3 zlib, record_samples", nan, nan, (c1 - c0) / values * 1e6))
    from agent.buffer.record import record_columns

    c0 = time.process_time()
    for f in full:
        record_columns(f)
    c1 = time.process_time()
    rows.append(("  format 3 zlib, record_columns", nan, nan, (c1 - c0) / values * 1e6))
    print(f"\n{w.name}: {len(w.tags)} tags, {polls} polls, codec alone")
    print(f"  {'encoding':<34}{'B/value':>9}{'enc µs/v':>10}{'dec µs/v':>10}")
    for label, b, e, d in rows:
        print(f"  {label:<34}{b:>9.2f}{e:>10.3f}{d:>10.3f}")


def _remove(directory: Path, prefix: str) -> None:
    for p in directory.glob(f"{prefix}*"):
        p.unlink()


def _files_size(directory: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in directory.glob(f"{prefix}*"))


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


async def buffer_part(w: Workload, polls: int, directory: Path, fmt: str) -> tuple[float, ...]:
    path = directory / f"{w.name}-{fmt}.db"
    _remove(directory, path.name)
    buf = SqliteBuffer(BufferConfig(path=str(path), max_bytes=1 << 34))
    await buf.open()
    if fmt == "2":
        buf._encoder = Format2Encoder()  # type: ignore[assignment]  # bench only
    data = list(batches(w, polls))
    values = sum(len(b) for b in data)
    io0, c0 = _io(), time.process_time()
    for b in data:
        await buf.append("press1", b)
    c1 = time.process_time()
    counted = buf.stats().bytes
    wal_peak = _size(Path(f"{path}-wal"))
    await buf.close()  # its checkpoint is part of what the appends cost the disk
    io1 = _io()
    files = _files_size(directory, path.name)
    buf = SqliteBuffer(BufferConfig(path=str(path), max_bytes=1 << 34))
    await buf.open()
    c2 = time.process_time()
    after = 0
    while True:
        recs = await buf.take(50, after)
        if not recs:
            break
        after = recs[-1].id
        await buf.commit([r.id for r in recs])
    c3 = time.process_time()
    await buf.close()
    _remove(directory, path.name)
    wchar = (io1["wchar"] - io0["wchar"]) / values
    wbytes = (io1["write_bytes"] - io0["write_bytes"]) / values
    return (
        files / values,
        wal_peak / (1 << 20),
        counted / values,
        GIB / (files / values) / 10_000 / 3600,  # hours of 10,000 values/s per GiB of file
        wchar,
        wbytes,
        (c1 - c0) / values * 1e6,
        (c3 - c2) / values * 1e6,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--dir", default=None, help="directory for the files (default: tmp)")
    parser.add_argument("--polls", type=int, default=300, help="polls per workload (1,000 tags)")
    args = parser.parse_args()
    loads = [(counters(), args.polls), (mixed(), args.polls), (mixed(10, "small"), args.polls * 20)]
    for w, polls in loads:
        codec_part(w, min(polls, 200 if len(w.tags) > 100 else 2000))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="record-bench-") as tmp:
        print(f"\nSqliteBuffer, files in {tmp}")
        print(
            f"  {'workload':<10}{'format':>7}{'file B/v':>10}{'WAL MiB':>9}{'counted':>9}"
            f"{'h/GiB':>8}"
            f"{'wchar B/v':>11}{'disk B/v':>10}{'append µs/v':>13}{'take µs/v':>11}"
        )
        for w, polls in loads:
            for fmt in ("2", "3"):
                r = await buffer_part(w, polls, Path(tmp), fmt)
                print(
                    f"  {w.name:<10}{fmt:>7}{r[0]:>10.2f}{r[1]:>9.1f}{r[2]:>9.2f}{r[3]:>8.1f}"
                    f"{r[4]:>11.2f}{r[5]:>10.2f}{r[6]:>13.3f}{r[7]:>11.3f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
