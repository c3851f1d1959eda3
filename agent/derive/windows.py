"""Window features: tumbling windows over chosen tags, published as derived tags.

A window is `length_s` seconds, aligned to the wall clock (window k covers
``[k × length_s, (k + 1) × length_s)`` seconds since 1970-01-01 UTC, by each reading's
`ts_agent`), or `length_samples` readings of each tag. When it closes, every tag of the
window gets one sample per feature, ``TAG.FEATURE``, plus ``TAG.good_share``, all in one
record, with ``ts_agent`` = the window's end and ``window_start`` = its start (for
sample windows: the first and last reading's `ts_agent`).

Only good numeric readings enter the statistics (agent.derive.moments); `good_share` is
their share of the tag's readings in the window (a NaN was made bad by the normaliser,
so it lowers the share instead of spoiling the mean). The features' quality:

- good: every reading of the window was good and the window was seen whole;
- uncertain: some were not (reason ``"2 of 10 readings not good"``), or the agent did not
  see the window from its start (``"partial window"``: the first window after a start,
  one cut by the wall clock going back, ``"clock jump"``);
- bad, value null: no good reading (``"no good readings"``, ``"no readings"``), or the
  feature is not defined for the data (``"undefined for a constant signal"``).

`good_share` itself is good (it is a count), null and bad when the tag had no readings.

A time window closes on the first reading at or after its end, or on the writer's clock
tick (`now` without samples) once it is over, so a device that goes silent still has its
last window published; windows in which nothing was read are not published. Nothing of
a window is persisted: a restart starts a new, partial window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.derive.config import GOOD_SHARE, WindowConfig
from agent.derive.moments import Moments
from agent.schema import Quality, WireSample

#: Features that keep the tag's unit (the others are counts or ratios).
_UNIT_FEATURES = frozenset({"mean", "min", "max", "std", "rms", "peak_to_peak"})


@dataclass(slots=True)
class _Acc:
    moments: Moments = field(default_factory=Moments)
    total: int = 0
    first_ts: datetime | None = None
    last_ts: datetime | None = None


def _number(value: object) -> float | None:
    t = type(value)
    if t is float:
        return value if math.isfinite(value) else None  # type: ignore[arg-type,return-value]
    if t is int:
        return float(value)  # type: ignore[arg-type]
    return None


class Window:
    """The running window of one `windows:` entry of one device."""

    def __init__(self, device: str, config: WindowConfig, units: dict[str, str | None]) -> None:
        self.device = device
        self.config = config
        self._tags = list(config.tags)
        self._wanted = set(config.tags)
        self._units = units
        self._acc: dict[str, _Acc] = {t: _Acc() for t in self._tags}
        self._bucket: int | None = None  # time windows: the current window's index
        self._partial = True  # the first window is not seen from its start
        #: Windows published, since start.
        self.closed = 0

    @property
    def tags(self) -> set[str]:
        return self._wanted

    def add(
        self, samples: Sequence[WireSample], now: datetime | None = None
    ) -> list[list[WireSample]]:
        """Take one poll's samples; return the records of the windows this closed.
        `now` (time windows): the poll's or the clock tick's time — a window whose end it
        has passed closes even when none of its tags was read since."""
        length = self.config.length_s
        if length is None:
            return self._add_counted(samples, self.config.length_samples or 0)
        out = self._due(now, length) if now is not None else []
        return out + self._add_timed(samples, length)

    def _due(self, now: datetime, length: float) -> list[list[WireSample]]:
        if self._bucket is None or math.floor(now.timestamp() / length) <= self._bucket:
            return []  # not over yet, or the clock went back (a reading will tell)
        record = self._close(_at(self._bucket * length), _at((self._bucket + 1) * length), None)
        self._bucket = None  # the next reading opens its window, seen from its start
        self._partial = False
        if not record:
            return []
        self.closed += 1
        return [record]

    def _add_timed(self, samples: Sequence[WireSample], length: float) -> list[list[WireSample]]:
        out: list[list[WireSample]] = []
        seen_ts: datetime | None = None
        k = 0
        for s in samples:
            tag = s["tag"]
            if tag not in self._wanted:
                continue
            ts = s["ts_agent"]
            if ts is not seen_ts:  # the samples of a poll share one ts_agent
                seen_ts = ts
                k = math.floor(ts.timestamp() / length)
            if self._bucket is None:
                self._bucket = k
            elif k != self._bucket:
                jumped = k < self._bucket
                start = _at(self._bucket * length)
                end = _at((self._bucket + 1) * length)
                record = self._close(start, end, "clock jump" if jumped else None)
                if record:
                    self.closed += 1
                    out.append(record)
                self._bucket = k
                self._partial = jumped
            self._take(self._acc[tag], s)
        return out

    def _add_counted(self, samples: Sequence[WireSample], length: int) -> list[list[WireSample]]:
        closed: list[WireSample] = []
        for s in samples:
            tag = s["tag"]
            if tag not in self._wanted:
                continue
            acc = self._acc[tag]
            self._take(acc, s)
            if acc.total >= length:
                assert acc.first_ts is not None
                assert acc.last_ts is not None
                closed += self._features(tag, acc, acc.first_ts, acc.last_ts, None, False)
                self._acc[tag] = _Acc()
        if closed:
            self.closed += 1
        return [closed] if closed else []

    @staticmethod
    def _take(acc: _Acc, s: WireSample) -> None:
        acc.total += 1
        ts = s["ts_agent"]
        if acc.first_ts is None:
            acc.first_ts = ts
        acc.last_ts = ts
        if s["quality"] == "good":
            x = _number(s["value"])
            if x is not None:
                acc.moments.add(x)

    def _close(self, start: datetime, end: datetime, cut: str | None) -> list[WireSample]:
        out: list[WireSample] = []
        if not any(a.total for a in self._acc.values()):
            return out
        for tag in self._tags:
            out += self._features(tag, self._acc[tag], start, end, cut, self._partial)
            self._acc[tag] = _Acc()
        return out

    def _features(
        self,
        tag: str,
        acc: _Acc,
        start: datetime,
        end: datetime,
        cut: str | None,
        partial: bool,
    ) -> list[WireSample]:
        m = acc.moments
        good = m.n
        quality: Quality = "good"
        reason: str | None = None
        if acc.total == 0:
            quality, reason = "bad", "no readings"
        elif good == 0:
            quality, reason = "bad", "no good readings"
        elif good < acc.total:
            quality, reason = "uncertain", f"{acc.total - good} of {acc.total} readings not good"
        elif cut is not None:
            quality, reason = "uncertain", cut
        elif partial:
            quality, reason = "uncertain", "partial window"
        unit = self._units.get(tag)
        out: list[WireSample] = []
        for feature in self.config.features:
            value = m.feature(feature) if quality != "bad" or feature == "count" else None
            q, r = quality, reason
            if value is None and q != "bad":  # count is always defined
                q, r = "bad", "undefined for a constant signal"
            out.append(self._sample(tag, feature, value, q, r, unit, start, end))
        share = good / acc.total if acc.total else None
        out.append(
            self._sample(
                tag,
                GOOD_SHARE,
                share,
                "good" if share is not None else "bad",
                None if share is not None else "no readings",
                None,
                start,
                end,
            )
        )
        return out

    def _sample(
        self,
        tag: str,
        feature: str,
        value: float | int | None,
        quality: Quality,
        reason: str | None,
        unit: str | None,
        start: datetime,
        end: datetime,
    ) -> WireSample:
        return {
            "device": self.device,
            "tag": f"{tag}.{feature}",
            "value": value,
            "quality": quality,
            "reason": reason,
            "code": None,
            "ts_source": None,
            "ts_agent": end,
            "unit": unit if feature in _UNIT_FEATURES else None,
            "seq": 0,
            "window_start": start,
        }


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
