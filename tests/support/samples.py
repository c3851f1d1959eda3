"""WireSample builders and buffer-file helpers for tests of the buffer, the forwarder
and payloads."""

from __future__ import annotations

from datetime import UTC, datetime
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


def make_samples(first: int, n: int, device: str = "press1", pad: int = 0) -> list[WireSample]:
    """n samples with seqs first..first+n-1; `pad` characters of string value each."""
    ts = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    return [
        WireSample(
            device=device,
            tag=f"t{seq}",
            value="x" * pad if pad else float(seq),
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
