"""Raw readings → Samples: scaling, unit, quality, timestamps and seq.

Pure code on the hot path: every tag's scale/offset/unit is looked up once per device
at start, and a sample is a plain dict (`WireSample`) rather than a pydantic object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import overload

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


class Columns(Sequence[RawReading]):
    """One poll in columns (a driver's `read_columns`): `values[i]` is the raw value of
    `tags[i]`, unless `i` is in `bad`, which holds that tag's bad reading.

    A Sequence of RawReading for every consumer (items are built on access), while the
    normaliser reads the columns directly: no object per value on the hot path."""

    __slots__ = ("bad", "tags", "values")

    def __init__(
        self,
        tags: Sequence[str],
        values: Sequence[Value | None],
        bad: Mapping[int, RawReading] | None = None,
    ) -> None:
        self.tags = tags
        self.values = values
        self.bad: Mapping[int, RawReading] = bad if bad is not None else {}

    def __len__(self) -> int:
        return len(self.tags)

    @overload
    def __getitem__(self, index: int) -> RawReading: ...
    @overload
    def __getitem__(self, index: slice) -> list[RawReading]: ...
    def __getitem__(self, index: int | slice) -> RawReading | list[RawReading]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        bad = self.bad.get(index)
        if bad is not None:
            return bad
        return RawReading(self.tags[index], self.values[index])

    def readings(self) -> list[RawReading]:
        """The RawReading view, as a list."""
        return list(self)


Readings = Sequence[RawReading]  # a list, or Columns


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

    def samples(self, readings: Readings, ts_agent: datetime, seq: SeqCounter) -> list[WireSample]:
        """One sample per reading, seqs consecutive."""
        if isinstance(readings, Columns):
            if not readings.bad:
                return self._good_samples(readings, ts_agent, seq)
            readings = readings.readings()
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

    def _good_samples(
        self, columns: Columns, ts_agent: datetime, seq: SeqCounter
    ) -> list[WireSample]:
        """`samples` of an all-good poll: no reading objects, one dict per value."""
        first = seq.take(len(columns.tags))
        device = self.device
        tags = self._tags
        out: list[WireSample] = []
        append = out.append
        for i, (tag, value) in enumerate(zip(columns.tags, columns.values, strict=True)):
            info = tags[tag]
            if not info.identity and value is not None:
                value = scale_value(value, info.scale, info.offset)
            append(
                {
                    "device": device,
                    "tag": tag,
                    "value": value,
                    "quality": "good",
                    "reason": None,
                    "code": None,
                    "ts_source": None,
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
