"""WireSample builders and buffer-file helpers for tests of the buffer, the forwarder
and payloads."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from agent.schema import WireSample

MIB = 1 << 20


def wire_sample(device: str, seq: int, *, tag: str = "t") -> WireSample:
    """One good sample whose value is its seq, stamped now."""
    return WireSample(
        device=device,
        tag=tag,
        value=seq,
        quality="good",
        reason=None,
        code=None,
        ts_source=None,
        ts_agent=datetime.now(UTC),
        unit=None,
        seq=seq,
    )


_PAD_ALPHABET = bytes(c for c in range(0x21, 0x7F) if c not in b'"\\')
_PAD_POOL = 8 << 20


@cache
def _pad_pool() -> str:
    """Pseudo-random printable ASCII (no quote, no backslash): text the record codec's
    compression cannot shrink by a quarter, so a padded sample stores about `pad` bytes."""
    table = bytes(_PAD_ALPHABET[i % len(_PAD_ALPHABET)] for i in range(256))
    return random.Random(0).randbytes(_PAD_POOL).translate(table).decode("ascii")


def pad_text(seq: int, pad: int) -> str:
    """`pad` characters of pseudo-random text, different for consecutive seqs."""
    pool = _pad_pool()
    start = (seq * pad) % (len(pool) - pad)
    return pool[start : start + pad]


def make_samples(first: int, n: int, device: str = "press1", pad: int = 0) -> list[WireSample]:
    """n samples with seqs first..first+n-1; `pad` characters of string value each
    (pseudo-random, see `pad_text`)."""
    ts = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    return [
        WireSample(
            device=device,
            tag=f"t{seq}",
            value=pad_text(seq, pad) if pad else float(seq),
            quality="good",
            reason=None,
            code=None,
            ts_source=None,
            ts_agent=ts,
            unit="bar",
            seq=seq,
        )
        for seq in range(first, first + n)
    ]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def size_of(path: Path | str) -> int:
    """Size of a file, 0 when it does not exist."""
    p = Path(path)
    return p.stat().st_size if p.exists() else 0


def counted(kind: str, data: bytes) -> int:
    """Bytes a record with `data` (as `take` returned it) counts against max_bytes: the
    durable buffer counts the body it stores (its tag dictionary is stored once, apart),
    the memory buffer the whole self-contained record it holds."""
    from agent.buffer.common import record_size
    from agent.buffer.record import split_record

    return record_size(len(data) if kind == "memory" else len(split_record(data)[1]))
