"""The derive stage of one device: between the normaliser and the buffer writer.

For each poll (the normalised samples, not yet numbered), `process` returns the records
to store, in this order:

1. the poll's own samples that go out: all of them, less what report by exception holds
   back (agent.derive.report) and the raw readings of window tags with
   ``publish_raw: false``; heartbeat repeats among them;
2. one record per cycle this poll triggered (agent.derive.cycles);
3. one record per window this poll closed (agent.derive.windows).

Cycles and windows see every reading (report by exception filters only what is
published raw). The writer numbers what is returned: **seqs count what leaves**, so a
sample held back takes no seq and consumers see no false gap; a gap in seqs still means
only loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from agent.derive.cycles import Cycle
from agent.derive.report import ExceptionFilter, effective_reports
from agent.derive.state import DeriveState
from agent.derive.windows import Window
from agent.schema import WireSample


class DeviceDerive:
    """Report by exception, cycles and windows of one device."""

    def __init__(self, device: Any, tags: Sequence[Any], state: DeriveState) -> None:
        name: str = device.name
        self.device = name
        self.report = ExceptionFilter(effective_reports(device, list(tags)))
        self.cycles = [
            Cycle(name, cfg, state.cycle(name, cfg.name)) for cfg in getattr(device, "cycles", [])
        ]
        group_of = {t.name: getattr(t, "group", "default") for t in tags}
        for cycle in self.cycles:
            state.put(name, cycle.config.name, cycle.state)  # the same dict: saved as it is
            cycle.read_groups = frozenset(group_of[t] for t in cycle.config.tags if t in group_of)
        units = {t.name: t.unit for t in tags}
        self.windows = [Window(name, cfg, units) for cfg in getattr(device, "windows", [])]
        self._local = {t for w in self.windows if not w.config.publish_raw for t in w.tags}

    @staticmethod
    def wanted(device: Any, tags: Sequence[Any]) -> bool:
        """Whether a device has anything for this stage to do."""
        return bool(
            getattr(device, "cycles", None)
            or getattr(device, "windows", None)
            or any(c.mode == "exception" for c in effective_reports(device, list(tags)).values())
        )

    def set_reader(self, read_soon: Callable[[frozenset[str]], None]) -> None:
        """How cycles with `read: at_trigger` ask the device's poller for a read now."""
        for cycle in self.cycles:
            if cycle.config.read == "at_trigger":
                cycle.request_read = read_soon

    def counts(self) -> dict[str, int]:
        """What the stage did since the device started (metrics, status)."""
        return {
            "held_back": self.report.suppressed,
            "repeats": self.report.repeats,
            "cycles": sum(c.cycles for c in self.cycles),
            "cycles_missed": sum(c.missed for c in self.cycles),
            "counter_resets": sum(c.resets for c in self.cycles),
            "debounced": sum(c.debounced for c in self.cycles),
            "windows": sum(w.closed for w in self.windows),
        }

    @property
    def dirty(self) -> bool:
        """Some durable state changed since `saved()`."""
        return any(c.dirty for c in self.cycles)

    def saved(self) -> None:
        for c in self.cycles:
            c.dirty = False

    @property
    def timed(self) -> bool:
        """Whether it has time windows (which the writer's clock ticks close on time)."""
        return any(w.config.length_s is not None for w in self.windows)

    def process(
        self, samples: list[WireSample], now: float, ts_agent: datetime | None = None
    ) -> list[list[WireSample]]:
        """One poll's samples (seqs not given yet) → the records to store (see above).
        `now`: the monotonic clock, for heartbeats and debounce; `ts_agent`: the poll's
        time (or a clock tick's, with no samples), which closes time windows that are
        over."""
        records: list[list[WireSample]] = []
        raw = samples
        if self._local:
            local = self._local
            raw = [s for s in samples if s["tag"] not in local]
        raw = self.report.filter(raw, now)
        if raw:
            records.append(raw)
        for cycle in self.cycles:
            record = cycle.add(samples, now)
            if record is not None:
                records.append(record)
        for window in self.windows:
            records += window.add(samples, ts_agent)
        return records
