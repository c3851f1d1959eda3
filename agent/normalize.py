"""Raw readings → Samples: scaling, unit, quality, timestamps and seq.

Pure code on the hot path: every tag's scale/offset/unit is looked up once per device
at start, and a sample is a plain dict (`WireSample`) rather than a pydantic object.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.schema import WireSample
from drivers.base import RawReading, TagCommon, Value


class SeqCounter:
    """Per-agent monotonic sequence numbers. Starts above the buffer's high-water mark,
    which the buffer persists with every append, so a restart never reuses a seq."""

    def __init__(self, last: int) -> None:
        self._last = last

    def take(self, n: int) -> int:
        """Reserve n numbers; return the first."""
        first = self._last + 1
        self._last += n
        return first

    @property
    def last(self) -> int:
        return self._last


@dataclass(frozen=True, slots=True)
class _TagInfo:
    unit: str | None
    scale: float
    offset: float
    identity: bool


class Normalizer:
    """Builds the samples of one device."""

    def __init__(self, device: str, tags: Iterable[TagCommon]) -> None:
        self.device = device
        self._tags = {
            t.name: _TagInfo(t.unit, t.scale, t.offset, t.scale == 1.0 and t.offset == 0.0)
            for t in tags
        }

    def samples(
        self, readings: Sequence[RawReading], ts_agent: datetime, seq: SeqCounter
    ) -> list[WireSample]:
        """One sample per reading, seqs consecutive."""
        first = seq.take(len(readings))
        out: list[WireSample] = []
        device = self.device
        tags = self._tags
        for i, r in enumerate(readings):
            info = tags[r.tag]
            value = r.value
            if not info.identity and value is not None:
                value = scale_value(value, info.scale, info.offset)
            out.append(
                {
                    "device": device,
                    "tag": r.tag,
                    "value": value,
                    "quality": r.quality,
                    "reason": r.reason,
                    "code": r.code,
                    "ts_source": r.ts_source,
                    "ts_agent": ts_agent,
                    "unit": info.unit,
                    "seq": first + i,
                }
            )
        return out


def scale_value(value: Value, scale: float, offset: float) -> Value:
    """raw * scale + offset for numbers (and lists of numbers); other values unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value * scale + offset
    if isinstance(value, list):
        return [
            v * scale + offset if isinstance(v, int | float) and not isinstance(v, bool) else v
            for v in value
        ]
    return value


def bad_readings(tags: Iterable[str], reason: str, code: int | None = None) -> list[RawReading]:
    """Readings for tags that could not be read at all."""
    return [RawReading(tag=t, value=None, quality="bad", reason=reason, code=code) for t in tags]
