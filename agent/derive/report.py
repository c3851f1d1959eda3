"""Report by exception: which normalised samples of a poll are published.

Per tag, against the last sample **published** (not the last one read, so a slow drift
cannot creep past the deadband unreported):

- the first sample of a tag always goes out (after every start: nothing is persisted);
- a change of quality, reason or code always goes out (a device going bad, and back);
- a number goes out when it differs from the last published value by more than the band,
  ``max(deadband_abs, deadband_pct / 100 × |last published|)``; without a deadband, on
  any change; anything else (bool, text, lists) on any change, including a change of type;
- when nothing went out for a tag for ``max_interval_s`` (measured on the monotonic
  clock, so a wall-clock jump neither floods nor silences it), the last published sample
  goes out again **as it was** — value, quality, ``ts_source`` and ``ts_agent`` — marked
  ``repeat: true``. A repeat never carries a new timestamp.

So a consumer that holds each published value until the next one (sample and hold) is
within the band of every reading the agent made. Suppressed samples take no seq: seqs
are given to what leaves, after this stage (agent.derive.stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.derive.config import ReportConfig
from agent.schema import WireSample


@dataclass(slots=True)
class _Last:
    sample: WireSample
    at: float  # monotonic time it (or its repeat) went out


def _is_number(value: object) -> bool:
    t = type(value)
    return t is int or t is float


class ExceptionFilter:
    """The report-by-exception state of one device."""

    def __init__(self, configs: Mapping[str, ReportConfig]) -> None:
        """configs: tag → its effective report config (tags absent are not filtered)."""
        self._configs = {t: c for t, c in configs.items() if c.mode == "exception"}
        self._last: dict[str, _Last] = {}
        #: Samples not published, and repeats sent, since start.
        self.suppressed = 0
        self.repeats = 0

    @property
    def active(self) -> bool:
        return bool(self._configs)

    def filter(self, samples: list[WireSample], now: float) -> list[WireSample]:
        """The samples of one poll that go out (repeats are copies, marked)."""
        configs = self._configs
        if not configs:
            return samples
        out: list[WireSample] = []
        last_of = self._last
        for s in samples:
            tag = s["tag"]
            cfg = configs.get(tag)
            if cfg is None:
                out.append(s)
                continue
            last = last_of.get(tag)
            if last is None or self._differs(s, last.sample, cfg):
                last_of[tag] = _Last(s, now)
                out.append(s)
                continue
            if cfg.max_interval_s is not None and now - last.at >= cfg.max_interval_s:
                repeat: WireSample = {**last.sample, "repeat": True}
                last.at = now
                self.repeats += 1
                out.append(repeat)
                continue
            self.suppressed += 1
        return out

    @staticmethod
    def _differs(s: WireSample, last: WireSample, cfg: ReportConfig) -> bool:
        if (
            s["quality"] != last["quality"]
            or s["reason"] != last["reason"]
            or s["code"] != last["code"]
        ):
            return True
        v, lv = s["value"], last["value"]
        if _is_number(v) and _is_number(lv):
            band = max(
                cfg.deadband_abs or 0.0,
                (cfg.deadband_pct or 0.0) / 100.0 * abs(lv),  # type: ignore[arg-type]
            )
            if band == 0.0:
                return bool(v != lv)
            return bool(abs(v - lv) > band)  # type: ignore[operator]
        if type(v) is not type(lv):
            return True
        return bool(v != lv) or s.get("value_text") != last.get("value_text")


def effective_reports(device: object, tags: list[object]) -> dict[str, ReportConfig]:
    """tag → the report config that applies: the tag's own, else its poll group's, else
    the device's; tags with none are absent."""
    dev_report = getattr(device, "report", None)
    groups = getattr(device, "poll_groups", {})
    out: dict[str, ReportConfig] = {}
    for tag in tags:
        cfg = getattr(tag, "report", None)
        if cfg is None:
            group = groups.get(getattr(tag, "group", "default"))
            cfg = getattr(group, "report", None) if group is not None else None
        if cfg is None:
            cfg = dev_report
        if cfg is not None:
            out[str(getattr(tag, "name"))] = cfg  # noqa: B009
    return out
