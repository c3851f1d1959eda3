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
  normalised (its own quality, reason, timestamps, unit), with ``cycle`` = the id.

The cycle id is the counter's value for an ``on: change`` trigger whose value is an
integer; otherwise the device's durable per-cycle sequence (1, 2, ...). The state that
decides the next trigger (the last good trigger value, the armed flag, the sequence) is
persisted by agent.derive.state after each store to the buffer, so a restart neither
repeats nor skips a cycle (see docs/derive.md for the one crash window that can repeat
one, with the same id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.derive.config import CycleConfig
from agent.schema import WireSample


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
        self.dirty = False
        self._last_fire: float | None = None
        self._ignored = 0
        #: Cycles recorded, triggers ignored by debounce, counter resets: since start.
        self.cycles = 0
        self.debounced = 0
        self.resets = 0

    def add(self, samples: Sequence[WireSample], now: float) -> list[WireSample] | None:
        """One poll's samples; the cycle's record when this poll triggered."""
        trig = self.config.trigger
        by_tag = {s["tag"]: s for s in samples}
        t = by_tag.get(trig.tag)
        if t is None or t["quality"] != "good" or t["value"] is None:
            return None
        value = t["value"]
        fired = self._step(value)
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
        return self._record(t, by_tag, fired)

    def _step(self, value: Any) -> tuple[Any, Any] | None:
        """Update the state with a good trigger value; (previous, new) when it fired."""
        trig = self.config.trigger
        st = self.state
        kind = trig.kind
        if kind in ("edge", "change"):
            prev = st["last"]
            if prev == value and type(prev) is type(value):
                return None
            st["last"] = value
            self.dirty = True
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
            self.dirty = True
            return None
        if armed and crossed:
            st["armed"] = False
            self.dirty = True
            return (None, value)
        if not armed and rearm:
            st["armed"] = True
            self.dirty = True
        return None

    def _record(
        self, trigger: WireSample, by_tag: dict[str, WireSample], fired: tuple[Any, Any]
    ) -> list[WireSample]:
        cfg = self.config
        st = self.state
        prev, value = fired
        reasons: list[str] = []
        missed: dict[str, int] | None = None
        if cfg.trigger.kind == "change" and _is_int(value):
            cycle_id: int = value
            if _is_int(prev):
                if value > prev + 1:
                    missed = {"first": prev + 1, "last": value - 1, "count": value - prev - 1}
                elif value <= prev:
                    reasons.append(f"counter went back from {prev} to {value}")
                    self.resets += 1
        else:
            st["seq"] += 1
            cycle_id = st["seq"]
        st["id"] = cycle_id
        self.dirty = True
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
                    "reason": "not read in the trigger's poll",
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
