"""Value generators for the simulators: pure functions of time, shared by every protocol.

A generator is built once per tag from its `SimulateSpec` (or a default chosen from
the tag's type) and asked for a value at a time `t` in seconds since the simulator
started. `random_walk` keeps state; the others are pure in `t`. The simulated machines
(`injection_moulding`, `press`) are in drivers/machines.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal

from drivers.base import Scalar, SimulateSpec
from drivers.machines import machine_signal

Kind = Literal["bool", "int", "float", "str"]
Generator = Callable[[float], Scalar]


def default_spec(kind: Kind, lo: float | None = None, hi: float | None = None) -> SimulateSpec:
    """The generator a tag gets when its config declares none: it changes over time."""
    if kind == "bool":
        return SimulateSpec(generator="toggle", period_s=5.0)
    if kind == "str":
        return SimulateSpec(generator="constant", value="SIM")
    if kind == "int":
        return SimulateSpec(generator="counter", value=0, step=1.0, period_s=1.0)
    low = 0.0 if lo is None else lo
    high = 100.0 if hi is None else hi
    return SimulateSpec(generator="sine", min=low, max=high, period_s=30.0)


def make_generator(
    spec: SimulateSpec,
    kind: Kind,
    *,
    lo: float | None = None,
    hi: float | None = None,
    seed: int = 0,
) -> Generator:
    """A generator for `spec`, producing values of `kind`, clamped to [lo, hi] when the
    target type has a range (an int16 register, say)."""
    low = spec.min if spec.min is not None else (0.0 if lo is None else lo)
    high = spec.max if spec.max is not None else (100.0 if hi is None else hi)
    if lo is not None:
        low = max(low, lo)
    if hi is not None:
        high = min(high, hi)
    start = spec.value
    period = spec.period_s

    def cast(x: float) -> Scalar:
        if kind == "bool":
            return bool(x)
        if kind == "int":
            v = round(x)
            if lo is not None:
                v = max(v, math.ceil(lo))
            if hi is not None:
                v = min(v, math.floor(hi))
            return v
        if kind == "str":
            return str(x)
        return float(x)

    g = spec.generator
    if g in ("injection_moulding", "press"):
        assert spec.role is not None  # SimulateSpec checks it
        signal = machine_signal(
            g, spec.role, period_s=period, seed=spec.seed, fault_period_s=spec.fault_period_s
        )
        if kind == "str":
            return lambda t: str(signal(t))
        return lambda t: cast(float(signal(t)))
    if g == "constant":
        const: Scalar = start if start is not None else low
        if kind == "str":
            return lambda t: str(const)
        if isinstance(const, str):
            raise ValueError(f"constant {const!r} does not fit a {kind} tag")
        if kind == "int" and isinstance(const, int) and not isinstance(const, bool):
            exact = const  # 64-bit integers do not survive a trip through float
            return lambda t: exact
        return lambda t: cast(float(const))
    if g == "toggle":
        first = bool(start) if start is not None else False
        return lambda t: cast(float(first ^ (int(t // period) % 2 == 1)))
    if g == "ramp":
        return lambda t: cast(low + (high - low) * ((t % period) / period))
    if g == "sine":
        mid, amp = (low + high) / 2, (high - low) / 2
        return lambda t: cast(mid + amp * math.sin(2 * math.pi * t / period))
    if g == "counter":
        base = float(start) if isinstance(start, int | float) else 0.0
        step = spec.step

        def counter(t: float) -> Scalar:
            v = base + step * math.floor(t / period)
            if hi is not None and v > hi:  # wrap like a real counter register
                span = hi - (lo or 0.0) + 1
                v = (lo or 0.0) + (v - (lo or 0.0)) % span
            return cast(v)

        return counter
    # random_walk
    rng = random.Random(seed)
    state = {"v": float(start) if isinstance(start, int | float) else (low + high) / 2}
    step = spec.step

    def walk(t: float) -> Scalar:
        v = state["v"] + rng.uniform(-step, step)
        state["v"] = min(max(v, low), high)
        return cast(state["v"])

    return walk
