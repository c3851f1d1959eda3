"""Cycle snapshots: one record per machine cycle.

A trigger is watched on the good readings of one tag (bad readings leave the state
alone, so a device that goes down and comes back compares against the last good value):

- ``edge: rising|falling`` — a bool going false → true / true → false;
- ``on: change`` — any change of the value (a shot counter);
- ``above: x`` / ``below: x`` — a number crossing x upwards / downwards, re-armed once
  it is back past x by `hysteresis`.

The first reading ever seen only sets the baseline (no cycle). At a trigger the record
holds, in this order:

- ``NAME``: value = the cycle id, ``ts_agent``/``ts_source`` = the trigger reading's
  (the trigger time), ``cycle`` = the id, and ``missed: {first, last, count}`` when a
  counter jumped by more than one. Quality good, or uncertain with a reason when the
  counter went backwards (``"counter went back from 1234 to 5"``: a PLC reset; the ids
  restart) or triggers were ignored by `debounce_s` since the previous cycle;
- ``NAME.TAG`` per captured tag: that tag's sample from the trigger's poll, as
  normalised (its own quality, reason, timestamps, unit), with ``cycle`` = the id. With
  ``read: at_trigger`` the poller is asked to read the captured tags' groups at once and
  the record waits for the first reading of each after the trigger (at most
  `read_timeout_s`, or until the next trigger; what was not read is bad).

The cycle id is the counter's value for an ``on: change`` trigger whose value is an
integer; otherwise the device's durable per-cycle sequence (1, 2, ...). The state that
decides the next trigger (the last good trigger value, the armed flag, the sequence) is
persisted by agent.derive.state after each store to the buffer, so a restart neither
repeats nor skips a cycle (see docs/derive.md for the one crash window that can repeat
one, with the same id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog

from agent.derive.config import CycleConfig
from agent.schema import WireSample

log = structlog.get_logger()

_NOT_READ = "waiting for the re-read"


class _Pending:
    """A snapshot waiting for the re-read of its tags (read: at_trigger)."""

    __slots__ = ("deadline", "record", "waiting")

    def __init__(self, record: list[WireSample], deadline: float) -> None:
        self.record = record
        self.deadline = deadline
        self.waiting = {c["tag"].split(".", 1)[1] for c in record[1:]}


def _valid(state: dict[str, Any]) -> bool:
    """A persisted state with the keys and types this module writes."""
    return (
        type(state.get("seq")) is int
        and state.get("armed") in (None, True, False)
        and isinstance(state.get("last"), bool | int | float | str | type(None))
        and isinstance(state.get("id"), int | type(None))
    )


def _is_int(value: object) -> bool:
    return type(value) is int


class Cycle:
    """The trigger state of one `cycles:` entry of one device.

    `state` is a JSON-able dict (agent.derive.state persists it); `dirty` is set when it
    changed since the last `saved()`."""

    def __init__(self, device: str, config: CycleConfig, state: dict[str, Any] | None) -> None:
        self.device = device
        self.config = config
        self.signature = f"{config.trigger.tag}:{config.trigger.kind}"
        # The restored dict itself is kept (not a copy): a device rebuilt by a reload
        # shares it with the one it replaces until that one has stopped.
        if state is not None and state.get("trigger") == self.signature and _valid(state):
            self.state = state
        else:
            self.state = {
                "trigger": self.signature,
                "last": None,  # last good trigger value (edge, change)
                "armed": None,  # above/below: True when a crossing may fire
                "seq": 0,  # the last sequence id given
                "id": None,  # the last cycle id given
            }
        # Decisions use `_live`; `state` (what is persisted) follows it except while a
        # snapshot waits for its re-read (read: at_trigger): a crash then leaves the
        # state from before the trigger, so the restarted agent takes the cycle again.
        self._live: dict[str, Any] = dict(self.state)
        self._started = False
        self._pending: _Pending | None = None
        #: read: at_trigger: called with the poll groups to read now.
        self.request_read: Callable[[frozenset[str]], None] | None = None
        #: read: at_trigger: the poll groups of the captured tags (set by the stage).
        self.read_groups: frozenset[str] = frozenset()
        self.dirty = False
        self._last_fire: float | None = None
        self._ignored = 0
        #: Cycles recorded, triggers ignored by debounce, counter resets: since start.
        self.cycles = 0
        self.debounced = 0
        self.resets = 0
        self.missed = 0  # cycle ids a counter skipped

    def add(self, samples: Sequence[WireSample], now: float) -> list[WireSample] | None:
        """One poll's samples; the cycle's record when this poll triggered (read:
        same_poll) or completed the re-read of a snapshot (read: at_trigger)."""
        if not self._started:
            # Built before the device it replaces (a reload) stopped: start from what
            # that one left, not from what it had when this one was built.
            self._started = True
            self._live = dict(self.state)
        by_tag = {s["tag"]: s for s in samples}
        out = self._fill(by_tag, now) if self._pending is not None else None
        record = self._trigger(by_tag, now)
        if record is not None:
            if self.config.read == "same_poll":
                out = record
            else:
                if self._pending is not None:  # the previous re-read did not finish
                    out = self._close("not read before the next cycle")
                self._pending = _Pending(record, now + self.config.read_timeout_s)
                if self.request_read is not None:
                    self.request_read(self.read_groups)
        if self._pending is None and self._live != self.state:
            self.state.update(self._live)
            self.dirty = True
        return out

    def _trigger(self, by_tag: dict[str, WireSample], now: float) -> list[WireSample] | None:
        t = by_tag.get(self.config.trigger.tag)
        if t is None or t["quality"] != "good" or t["value"] is None:
            return None
        fired = self._step(t["value"])
        if not fired:
            return None
        cfg = self.config
        if (
            cfg.debounce_s > 0
            and self._last_fire is not None
            and now - self._last_fire < cfg.debounce_s
        ):
            self._ignored += 1
            self.debounced += 1
            return None
        self._last_fire = now
        return self._record(t, by_tag if cfg.read == "same_poll" else {}, fired)

    def _fill(self, by_tag: dict[str, WireSample], now: float) -> list[WireSample] | None:
        """A poll after the trigger: take the captured tags it holds."""
        pending = self._pending
        assert pending is not None
        name = self.config.name
        record = pending.record
        for i in range(1, len(record)):
            tag = record[i]["tag"][len(name) + 1 :]
            if tag in pending.waiting and tag in by_tag:
                col: WireSample = {**by_tag[tag]}
                col["tag"] = f"{name}.{tag}"
                col["cycle"] = record[0]["cycle"]
                col.pop("repeat", None)
                record[i] = col
                pending.waiting.discard(tag)
        if not pending.waiting:
            return self._close(None)
        if now >= pending.deadline:
            return self._close(f"not read within read_timeout_s ({self.config.read_timeout_s} s)")
        return None

    def _close(self, missing: str | None) -> list[WireSample]:
        pending = self._pending
        assert pending is not None
        self._pending = None
        if missing is not None:
            for col in pending.record[1:]:
                if col["reason"] == _NOT_READ:
                    col["reason"] = missing
        return pending.record

    def _step(self, value: Any) -> tuple[Any, Any] | None:
        """Update the state with a good trigger value; (previous, new) when it fired."""
        trig = self.config.trigger
        st = self._live
        kind = trig.kind
        if kind in ("edge", "change"):
            prev = st["last"]
            if prev == value and type(prev) is type(value):
                return None
            st["last"] = value
            if prev is None:
                return None  # the baseline
            if kind == "change":
                return (prev, value)
            rising = not bool(prev) and bool(value)
            falling = bool(prev) and not bool(value)
            if (trig.edge == "rising" and rising) or (trig.edge == "falling" and falling):
                return (prev, value)
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        x = float(value)
        armed = st["armed"]
        if kind == "above":
            assert trig.above is not None
            crossed, rearm = x > trig.above, x <= trig.above - trig.hysteresis
        else:
            assert trig.below is not None
            crossed, rearm = x < trig.below, x >= trig.below + trig.hysteresis
        if armed is None:  # the baseline: armed unless already past the threshold
            st["armed"] = not crossed
            return None
        if armed and crossed:
            st["armed"] = False
            return (None, value)
        if not armed and rearm:
            st["armed"] = True
        return None

    def _record(
        self, trigger: WireSample, by_tag: dict[str, WireSample], fired: tuple[Any, Any]
    ) -> list[WireSample]:
        cfg = self.config
        st = self._live
        prev, value = fired
        reasons: list[str] = []
        missed: dict[str, int] | None = None
        if cfg.trigger.kind == "change" and _is_int(value):
            cycle_id: int = value
            if _is_int(prev):
                if value > prev + 1:
                    missed = {"first": prev + 1, "last": value - 1, "count": value - prev - 1}
                    self.missed += missed["count"]
                    log.warning("cycle.missed", device=self.device, cycle=cfg.name, **missed)
                elif value <= prev:
                    reasons.append(f"counter went back from {prev} to {value}")
                    self.resets += 1
                    log.warning(
                        "cycle.counter_reset",
                        device=self.device,
                        cycle=cfg.name,
                        previous=prev,
                        value=value,
                    )
        else:
            st["seq"] += 1
            cycle_id = st["seq"]
        st["id"] = cycle_id
        if self._ignored:
            reasons.append(f"{self._ignored} triggers within debounce_s ignored")
            self._ignored = 0
        self.cycles += 1
        head: WireSample = {
            "device": self.device,
            "tag": cfg.name,
            "value": cycle_id,
            "quality": "uncertain" if reasons else "good",
            "reason": "; ".join(reasons) if reasons else None,
            "code": None,
            "ts_source": trigger["ts_source"],
            "ts_agent": trigger["ts_agent"],
            "unit": None,
            "seq": 0,
            "cycle": cycle_id,
        }
        if missed is not None:
            head["missed"] = missed
        out = [head]
        for tag in cfg.tags:
            s = by_tag.get(tag)
            col: WireSample
            if s is None:  # validate keeps tags in the trigger's group; a driver may not
                col = {
                    "device": self.device,
                    "tag": tag,
                    "value": None,
                    "quality": "bad",
                    "reason": "not read in the trigger's poll"
                    if cfg.read == "same_poll"
                    else _NOT_READ,
                    "code": None,
                    "ts_source": None,
                    "ts_agent": trigger["ts_agent"],
                    "unit": None,
                    "seq": 0,
                }
            else:
                col = {**s}
            col["tag"] = f"{cfg.name}.{tag}"
            col["cycle"] = cycle_id
            col.pop("repeat", None)
            out.append(col)
        return out
