"""The per-tag guards of a write, as pure functions: limits, allowed values, largest step,
rate, interlock. Each returns None (go ahead) or the `Refusal` the result and the audit
log carry. The order they run in, and the guards about the request itself (enabled,
signature, writable), are the handler's (agent.command.handler)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from drivers.base import WriteSpec

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not carried out: `code` a stable id, `text` for people."""

    code: str
    text: str


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _same(a: object, b: object) -> bool:
    """Equal as values of a tag: 1 and 1.0 are, true and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def limit_refusal(value: object, spec: WriteSpec | None) -> Refusal | None:
    """min, max and allowed values (engineering units)."""
    if spec is None:
        return None
    if spec.allowed is not None and not any(_same(value, a) for a in spec.allowed):
        shown = ", ".join(repr(a) for a in spec.allowed)
        return Refusal("not_allowed", f"{value!r} is not one of the allowed values: {shown}")
    number = _num(value)
    if number is not None and not math.isnan(number):
        if spec.min is not None and number < spec.min:
            return Refusal("below_min", f"{value!r} is below min {spec.min:g}")
        if spec.max is not None and number > spec.max:
            return Refusal("above_max", f"{value!r} is above max {spec.max:g}")
    return None


def step_refusal(value: object, previous: object, spec: WriteSpec | None) -> Refusal | None:
    """max_step: the change from the value the device holds now."""
    if spec is None or spec.max_step is None:
        return None
    new, old = _num(value), _num(previous)
    if old is None or not math.isfinite(old):
        return Refusal(
            "previous_unknown",
            f"max_step needs the current value, and it is not a number ({previous!r})",
        )
    assert new is not None  # limit and conversion checks passed: a number
    step = abs(new - old)
    if step > spec.max_step:
        return Refusal(
            "step_too_large",
            f"a change of {step:g} (from {previous!r} to {value!r}) is larger than "
            f"max_step {spec.max_step:g}",
        )
    return None


def interlock_refusal(name: str, value: object, reason: str | None) -> Refusal | None:
    """The permissive tag `name` read `value` (None and `reason` when it could not be read);
    only true (a bool true, or a number other than 0) lets the write go ahead."""
    if value is None:
        return Refusal("interlock_unreadable", f"interlock {name!r} cannot be read: {reason}")
    if value is True or (_num(value) is not None and value != 0 and not isinstance(value, bool)):
        return None
    return Refusal("interlock_off", f"interlock {name!r} is not true (it reads {value!r})")


class RateLimiter:
    """Writes per key (device, tag) in the last 60 s; only writes that were carried out
    (attempted at the device) count."""

    def __init__(self) -> None:
        self._times: dict[Hashable, deque[float]] = {}

    def refusal(self, key: Hashable, limit: int | None, now: float) -> Refusal | None:
        if limit is None:
            return None
        times = self._times.get(key)
        if times is None:
            return None
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        if len(times) >= limit:
            return Refusal(
                "rate_limited",
                f"{len(times)} writes to this tag in the last 60 s (max_per_min {limit})",
            )
        return None

    def record(self, key: Hashable, now: float) -> None:
        self._times.setdefault(key, deque()).append(now)
