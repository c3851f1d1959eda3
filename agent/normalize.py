"""Raw readings → Samples: scaling, unit, quality, timestamps and seq.

Pure code on the hot path: every tag's scale/offset/unit is looked up once per device
at start, and a sample is a plain dict (`WireSample`) rather than a pydantic object.

Every sample that leaves here can be encoded by every payload layout (docs/mqtt.md,
"Values JSON cannot carry"):

- a value JSON cannot carry exactly (NaN, ±Infinity, an integer outside the 64-bit
  range, text that is not valid Unicode, a nesting deeper than `MAX_DEPTH`, a type that
  is not a published value) becomes ``"value": null, "quality": "bad"`` with reason
  `not a number`, `infinite`, `out of range`, `invalid text`, `too deeply nested` or
  `unsupported value`, and the value as text in ``value_text`` (``"NaN"``,
  ``"Infinity"``, ``"-Infinity"``, the digits of the integer, ...);
- a device timestamp that is naive (no time zone) or outside 1970-01-01 ..
  9999-12-30 (OPC UA's DateTime 0 decodes as 1601-01-01, its largest as 9999-12-31)
  becomes ``"ts_source": null``; a good sample then says why in `reason`
  (`ts_source out of range`, `ts_source without time zone`, `ts_source not a time`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import overload

from agent.samples import PollSamples
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


@dataclass(frozen=True, slots=True)
class _Plan:
    tags: Sequence[str]
    units: list[str | None]
    scaled: list[tuple[int, float, float]]  # (index, scale, offset) of the scaled tags


#: Tag lists a normaliser keeps plans for (a driver has one per poll group).
_PLANS_MAX = 64


def _suspects(values: list[Value | None]) -> list[int]:
    """The indices of the values that need a closer look (`_suspect`), found at C speed
    when every value is a finite float, an int in range, a bool or None."""
    types = set(map(type, values))
    if types <= _PLAIN_TYPES:
        floats: list[float] = (
            values if types == {float} else [v for v in values if type(v) is float]  # type: ignore[assignment]
        )
        total = sum(floats)
        if total - total == 0.0:  # not NaN: no NaN or ±Inf among them (nor an overflow)
            if int not in types:
                return []
            ints: list[int] = (
                values if types == {int} else [v for v in values if type(v) is int]  # type: ignore[assignment]
            )
            if min(ints) >= INT_MIN and max(ints) <= INT_MAX:
                return []
    return [i for i, v in enumerate(values) if v is not None and _suspect(v)]


class Normalizer:
    """Builds the samples of one device."""

    def __init__(self, device: str, tags: Iterable[TagCommon]) -> None:
        self.device = device
        self._tags = {
            t.name: _TagInfo(t.unit, t.scale, t.offset, t.scale == 1.0 and t.offset == 0.0)
            for t in tags
        }
        self._plans: dict[int, _Plan] = {}

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
            sample: WireSample = {
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
            if value is not None:
                if not info.identity:
                    value = sample["value"] = _scaled(value, info)
                if value is not None and _suspect(value):
                    _check_value(sample, value)
            ts = r.ts_source
            if ts is not None:
                problem = ts_source_problem(ts)
                if problem is not None:
                    sample["ts_source"] = None
                    if sample["quality"] == "good" and sample["reason"] is None:
                        sample["reason"] = problem
            out.append(sample)
        return out

    def batch(
        self, readings: Readings, ts_agent: datetime, seq: SeqCounter
    ) -> PollSamples | list[WireSample]:
        """`samples`, by columns where it can be (`agent.samples.PollSamples`: a poll read
        as columns with no bad reading); equal item for item to what `samples` returns,
        the same seqs taken."""
        if not isinstance(readings, Columns) or readings.bad:
            return self.samples(readings, ts_agent, seq)
        plan = self._plan(readings.tags)
        values = list(readings.values)
        if len(values) != len(plan.units):
            raise ValueError(f"{len(values)} values for {len(plan.units)} tags")
        for i, scale, offset in plan.scaled:
            value = values[i]
            if value is not None:
                # try/except, not contextlib.suppress: a context manager per value costs.
                try:  # noqa: SIM105
                    values[i] = scale_value(value, scale, offset)
                except (OverflowError, TypeError):
                    pass  # an int too large for a float: made bad below (out of range)
        not_good: dict[int, tuple[str, str | None, int | None]] = {}
        texts: dict[int, str] = {}
        for i in _suspects(values):
            value = values[i]
            problem = value_problem(value)
            if problem is not None:
                values[i] = None
                not_good[i] = ("bad", problem, None)
                texts[i] = value_text(value)
        first = seq.take(len(values))
        return PollSamples(
            self.device, plan.tags, plan.units, values, ts_agent, first, not_good, texts
        )

    def _plan(self, tags: Sequence[str]) -> _Plan:
        """The units and scaled tags of a poll's tag list (the driver hands the same list
        object every poll: made once per list)."""
        plan = self._plans.get(id(tags))
        if plan is not None and plan.tags is tags:
            return plan
        infos = [self._tags[t] for t in tags]  # KeyError: a tag this device does not have
        plan = _Plan(
            tags,
            [info.unit for info in infos],
            [(i, info.scale, info.offset) for i, info in enumerate(infos) if not info.identity],
        )
        if len(self._plans) >= _PLANS_MAX:
            self._plans.clear()
        self._plans[id(tags)] = plan
        return plan

    def _good_samples(
        self, columns: Columns, ts_agent: datetime, seq: SeqCounter
    ) -> list[WireSample]:
        """`samples` of an all-good poll: no reading objects, one dict per value."""
        first = seq.take(len(columns.tags))
        device = self.device
        tags = self._tags
        out: list[WireSample] = []
        append = out.append
        int_min, int_max = INT_MIN, INT_MAX
        for i, (tag, value) in enumerate(zip(columns.tags, columns.values, strict=True)):
            info = tags[tag]
            if value is not None and not info.identity:
                # try/except, not contextlib.suppress: a context manager per value costs.
                try:  # noqa: SIM105
                    value = scale_value(value, info.scale, info.offset)
                except (OverflowError, TypeError):
                    pass  # an int too large for a float: made bad below (out of range)
            sample: WireSample = {
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
            append(sample)
            # The common types checked inline (this loop runs once per value): a finite
            # float, an int in range, ASCII text, a bool. Anything else is looked at.
            t = type(value)
            if t is float:
                if value - value:  # type: ignore[operator]  # NaN for NaN and ±Inf
                    _check_value(sample, value)
            elif t is int:
                if not int_min <= value <= int_max:  # type: ignore[operator]
                    _check_value(sample, value)
            elif (
                value is not None and t is not bool and not (t is str and value.isascii())  # type: ignore[union-attr]
            ):
                _check_value(sample, value)
        return out


#: The integers every layout can carry: JSON as encoded by orjson, and Sparkplug's
#: Int64 / UInt64.
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1
#: Lists and structures nested deeper than this are not published (bad quality).
MAX_DEPTH = 32

#: Types whose values `_suspects` checks in bulk.
_PLAIN_TYPES = frozenset({float, int, bool, type(None)})

NOT_A_NUMBER = "not a number"
INFINITE = "infinite"
OUT_OF_RANGE = "out of range"
INVALID_TEXT = "invalid text"
TOO_DEEP = "too deeply nested"
UNSUPPORTED = "unsupported value"

#: Device timestamps outside [TS_MIN, TS_MAX) are not published (ts_source null):
#: before the Unix epoch (OPC UA's DateTime 0 is 1601-01-01) or at the end of year 9999
#: (OPC UA's largest DateTime), where conversions overflow.
TS_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TS_MAX = datetime(9999, 12, 31, tzinfo=UTC)
TS_OUT_OF_RANGE = "ts_source out of range"
TS_NAIVE = "ts_source without time zone"
TS_NOT_A_TIME = "ts_source not a time"


def ts_source_problem(ts: object) -> str | None:
    """Why a device timestamp cannot be published, or None when it can."""
    if not isinstance(ts, datetime):
        return TS_NOT_A_TIME
    try:
        if ts.utcoffset() is None:
            return TS_NAIVE
        if not TS_MIN <= ts < TS_MAX:
            return TS_OUT_OF_RANGE
    except (OverflowError, ValueError):
        return TS_OUT_OF_RANGE
    return None


def _suspect(value: object) -> bool:
    """False for the values that need no closer look (see `_good_samples`)."""
    t = type(value)
    if t is float:
        return bool(value - value)  # type: ignore[operator]
    if t is int:
        return not INT_MIN <= value <= INT_MAX  # type: ignore[operator]
    if t is bool:
        return False
    return not (isinstance(value, str) and t is str and value.isascii())


def value_problem(value: object, depth: int = 0) -> str | None:
    """Why `value` cannot be published as it is (a reason above), or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return NOT_A_NUMBER
        if math.isinf(value):
            return INFINITE
        return None if type(value) is float else UNSUPPORTED
    if isinstance(value, int):
        return None if INT_MIN <= value <= INT_MAX else OUT_OF_RANGE
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return INVALID_TEXT
        return None
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        for item in value:
            problem = value_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        for key, item in value.items():
            if type(key) is not str:
                return UNSUPPORTED
            problem = value_problem(key, depth + 1) or value_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    return UNSUPPORTED


def value_text(value: object) -> str:
    """`value` as text, for ``value_text``: JSON with NaN / Infinity / -Infinity as
    JavaScript writes them, escaped to ASCII (so it is valid whatever the value held)."""
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=True, default=ascii)
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        return ascii(value)
    except (ValueError, RecursionError):
        # An int too long for str() (CPython limits it to 4,300 digits) or a nesting
        # deeper than the interpreter's recursion limit.
        if isinstance(value, int):
            return f"<integer of {value.bit_length()} bits>"
        return f"<{type(value).__name__}>"


def _check_value(sample: WireSample, value: object) -> None:
    """Make `sample` bad when its value cannot be published (see the module docstring)."""
    problem = value_problem(value)
    if problem is None:
        return
    sample["value"] = None
    sample["quality"] = "bad"
    sample["reason"] = problem
    sample["value_text"] = value_text(value)


def _scaled(value: Value, info: _TagInfo) -> Value | None:
    try:
        return scale_value(value, info.scale, info.offset)
    except (OverflowError, TypeError):
        # An integer too large for a float cannot be scaled: it is kept as it is and
        # made bad by the value check (out of range).
        return value


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
