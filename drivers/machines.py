"""Simulated machines for simulator mode: an injection moulding machine and a press with a
vibration sensor, so that a whole data path (cycle snapshots, window features, datasets)
can be tried before the real machine is connected. Protocol-independent, pure Python,
imports nothing of the agent or the drivers.

A tag shows one *role* of a machine (`simulate: {generator: injection_moulding, role:
cushion, period_s: 5}`). Every value is a pure function of the time since the simulator
started and of (period_s, seed): tags with the same generator, period_s and seed show
one machine, whichever simulator and protocol serves them, and a value read twice at the
same time is the same.

**Injection moulding machine** (`injection_moulding`; role names after the KAMP
injection moulding dataset's columns). Shot k lasts `period_s` ± a few percent (jitter);
`shot_counter` counts the completed shots, and every per-shot role shows the parameters
*of the last completed shot*: they all change together, at the shot, so one poll reads a
coherent row. The process drifts slowly (barrel temperatures), has cooling-water
episodes (mould temperature drops, injection pressure rises) and worn-check-ring
episodes (cushion falls); `pass_fail` (true = good part) is false when the cushion is
too small, the mould too cold or the pressure off its nominal value, and for about 1 %
of shots at random. `screw_position` is live: it moves through the phases of the shot
in progress (injection, holding, plasticizing, cooling).

**Press** (`press`, for 10 Hz sampling): `vibration` is a 1.3 Hz running frequency with
two harmonics and noise; `motor_current` an idle current with a load peak per stroke
(`period_s` per stroke); `stroke_counter` counts strokes. With `fault_period_s`, a fault
grows over each such period (nothing for the first 40 %, then growing to full at the end,
then reset as by a repair): a 2.17 Hz component and an impact after each stroke in the
vibration, a higher current; `fault_level` (0..1) is that ground truth, for labelling.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

MachineValue = float | int | bool

MOULDING_ROLES: tuple[str, ...] = (
    "shot_counter",
    "cycle_time",
    "injection_time",
    "filling_time",
    "plasticizing_time",
    "clamp_close_time",
    "injection_pressure",
    "switch_over_pressure",
    "holding_pressure",
    "back_pressure",
    "injection_speed",
    "switch_over_position",
    "plasticizing_position",
    "cushion",
    "screw_position",
    "barrel_temperature_1",
    "barrel_temperature_2",
    "barrel_temperature_3",
    "hopper_temperature",
    "mould_temperature_1",
    "mould_temperature_2",
    "pass_fail",
)
PRESS_ROLES: tuple[str, ...] = ("stroke_counter", "vibration", "motor_current", "fault_level")

ROLES: dict[str, tuple[str, ...]] = {"injection_moulding": MOULDING_ROLES, "press": PRESS_ROLES}

#: Nominal values the pass/fail rule compares against.
NOMINAL_INJECTION_PRESSURE = 1450.0
MIN_CUSHION = 2.5
MIN_MOULD_TEMPERATURE = 35.5


def _rng(*key: object) -> random.Random:
    # A str seed is hashed with SHA-512: the same numbers in every process and run.
    return random.Random(":".join(map(str, key)))


@dataclass(frozen=True, slots=True)
class Shot:
    """The parameters of one completed shot."""

    number: int
    values: dict[str, MachineValue]


class MouldingMachine:
    """Shots of one simulated injection moulding machine (see the module docstring)."""

    def __init__(self, period_s: float, seed: int) -> None:
        self.period_s = period_s
        self.seed = seed
        self._ends: list[float] = []  # end time of shot 1, 2, ...
        self._rows: dict[int, Shot] = {}

    def duration(self, k: int) -> float:
        jitter = _rng(self.seed, "duration", k).gauss(0.0, 0.025)
        return self.period_s * min(max(1.0 + jitter, 0.92), 1.12)

    def shots_done(self, t: float) -> int:
        """Shots completed at time t (≥ 0)."""
        while not self._ends or self._ends[-1] <= t:
            last = self._ends[-1] if self._ends else 0.0
            self._ends.append(last + self.duration(len(self._ends) + 1))
        return bisect.bisect_right(self._ends, t)

    def shot_start(self, k: int) -> float:
        """Start time of shot k (1-based); shots_done must have covered it."""
        return 0.0 if k <= 1 else self._ends[k - 2]

    def shot(self, k: int) -> Shot:
        row = self._rows.get(k)
        if row is None:
            row = self._make(k)
            if len(self._rows) > 4096:
                self._rows.clear()
            self._rows[k] = row
        return row

    def _make(self, k: int) -> Shot:
        r = _rng(self.seed, "shot", k)
        # Slow drift of the barrel heaters, period ≈ 500 shots.
        drift = 1.5 * math.sin(2 * math.pi * k / 500 + self.seed)
        # Cooling-water episodes: 25 shots in every 300 (the first from shot 150), the
        # mould up to 6 °C colder.
        phase = (k + 150 + 37 * self.seed) % 300
        cold = 6.0 * math.sin(math.pi * phase / 25) if phase < 25 else 0.0
        # Worn check ring: 15 shots in every 450 (the first from shot 250), the cushion
        # falls by up to 2.2 mm.
        wphase = (k + 200 + 11 * self.seed) % 450
        wear = 2.2 * math.sin(math.pi * wphase / 15) if wphase < 15 else 0.0
        mould_1 = 40.0 - cold + r.gauss(0, 0.4)
        mould_2 = 39.0 - 0.8 * cold + r.gauss(0, 0.4)
        injection_pressure = NOMINAL_INJECTION_PRESSURE + 3.5 * cold + r.gauss(0, 12)
        cushion = 4.0 - wear + r.gauss(0, 0.22)
        barrel_1 = 230.0 + drift + r.gauss(0, 0.6)
        plasticizing = 3.2 + 0.04 * (230.0 - barrel_1) + r.gauss(0, 0.08)
        injection_time = 1.20 + 0.0008 * cold * 10 + r.gauss(0, 0.02)
        values: dict[str, MachineValue] = {
            "shot_counter": k,
            "cycle_time": round(self.duration(k), 3),
            "injection_time": injection_time,
            "filling_time": injection_time * 0.8 + r.gauss(0, 0.01),
            "plasticizing_time": plasticizing,
            "clamp_close_time": 1.10 + r.gauss(0, 0.015),
            "injection_pressure": injection_pressure,
            "switch_over_pressure": injection_pressure * 0.86 + r.gauss(0, 5),
            "holding_pressure": 600.0 + r.gauss(0, 4),
            "back_pressure": 60.0 + r.gauss(0, 1.5),
            "injection_speed": 85.0 - 0.3 * cold + r.gauss(0, 1.2),
            "switch_over_position": 12.0 + r.gauss(0, 0.08),
            "plasticizing_position": 55.0 + r.gauss(0, 0.15),
            "cushion": cushion,
            "barrel_temperature_1": barrel_1,
            "barrel_temperature_2": 225.0 + drift + r.gauss(0, 0.6),
            "barrel_temperature_3": 220.0 + 0.8 * drift + r.gauss(0, 0.6),
            "hopper_temperature": 62.0 + r.gauss(0, 0.5),
            "mould_temperature_1": mould_1,
            "mould_temperature_2": mould_2,
        }
        bad = (
            cushion < MIN_CUSHION
            or mould_1 < MIN_MOULD_TEMPERATURE
            or abs(injection_pressure - NOMINAL_INJECTION_PRESSURE) > 45
            or r.random() < 0.01
        )
        values["pass_fail"] = not bad
        return Shot(k, values)

    def value(self, role: str, t: float) -> MachineValue:
        t = max(t, 0.0)
        done = self.shots_done(t)
        if role == "shot_counter":
            return done
        if role == "screw_position":
            return self._screw(done, t)
        # Before the first shot ends the machine shows the parameters of "shot 0".
        return self.shot(done).values[role]

    def _screw(self, done: int, t: float) -> float:
        k = done + 1  # the shot in progress
        start = self.shot_start(k)
        p = (t - start) / self.duration(k)
        row = self.shot(k).values
        back, switch, cushion = (
            float(row["plasticizing_position"]),
            float(row["switch_over_position"]),
            float(row["cushion"]),
        )
        if p < 0.10:  # clamp closing
            return back
        if p < 0.25:  # injection, to the switch-over point
            return back + (switch - back) * (p - 0.10) / 0.15
        if p < 0.30:  # end of filling
            return switch + (cushion - switch) * (p - 0.25) / 0.05
        if p < 0.45:  # holding
            return cushion
        if p < 0.75:  # plasticizing: the screw turns and moves back
            return cushion + (back - cushion) * (p - 0.45) / 0.30
        return back  # cooling, ejection


class Press:
    """One simulated press with a vibration sensor (see the module docstring)."""

    RUNNING_HZ = 1.3
    FAULT_HZ = 2.17

    def __init__(self, period_s: float, seed: int, fault_period_s: float | None) -> None:
        self.period_s = period_s
        self.seed = seed
        self.fault_period_s = fault_period_s

    def fault_level(self, t: float) -> float:
        if self.fault_period_s is None:
            return 0.0
        p = (t % self.fault_period_s) / self.fault_period_s
        return 0.0 if p < 0.4 else ((p - 0.4) / 0.6) ** 2

    def _noise(self, t: float, what: str) -> float:
        return _rng(self.seed, what, round(t * 1000)).gauss(0.0, 1.0)

    def value(self, role: str, t: float) -> MachineValue:
        t = max(t, 0.0)
        if role == "stroke_counter":
            return math.floor(t / self.period_s)
        level = self.fault_level(t)
        if role == "fault_level":
            return round(level, 4)
        stroke = (t % self.period_s) / self.period_s
        if role == "motor_current":
            load = 18.0 * math.sin(math.pi * stroke / 0.3) if stroke < 0.3 else 0.0
            return 12.0 + load + 2.0 * level + 0.2 * self._noise(t, "current")
        # vibration, mm/s
        w = 2 * math.pi * self.RUNNING_HZ * t
        v = 1.0 * math.sin(w) + 0.35 * math.sin(2 * w + 0.4) + 0.15 * math.sin(3 * w + 1.1)
        v += 0.08 * self._noise(t, "vibration")
        if level:
            v += 1.5 * level * math.sin(2 * math.pi * self.FAULT_HZ * t)
            after = stroke - 0.3  # the impact when the stroke bottoms out
            if 0.0 <= after < 0.1:
                v += 3.0 * level * math.exp(-after * 40) * math.cos(2 * math.pi * 9 * after)
        return v


@functools.lru_cache(maxsize=64)
def _moulding(period_s: float, seed: int) -> MouldingMachine:
    return MouldingMachine(period_s, seed)


@functools.lru_cache(maxsize=64)
def _press(period_s: float, seed: int, fault_period_s: float | None) -> Press:
    return Press(period_s, seed, fault_period_s)


def machine_signal(
    machine: str, role: str, *, period_s: float, seed: int, fault_period_s: float | None = None
) -> Callable[[float], MachineValue]:
    """The signal of `role` of a machine, as a function of the simulator's time. Raises
    ValueError for an unknown machine or role."""
    roles = ROLES.get(machine)
    if roles is None:
        raise ValueError(f"unknown machine {machine!r} (known: {', '.join(ROLES)})")
    if role not in roles:
        raise ValueError(f"{machine} has no role {role!r} (roles: {', '.join(roles)})")
    if machine == "press":
        press = _press(period_s, seed, fault_period_s)
        return lambda t: press.value(role, t)
    moulding = _moulding(period_s, seed)
    return lambda t: moulding.value(role, t)
