"""drivers/machines.py: the simulated moulding machine gives one coherent row per shot,
a pass/fail bit that follows its parameters; the press has its running frequency, its
strokes and a growing fault. SimulateSpec checks the machine fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import ConfigError, load_config
from drivers.base import SimulateSpec
from drivers.generators import make_generator
from drivers.machines import (
    MIN_CUSHION,
    MOULDING_ROLES,
    MouldingMachine,
    Press,
)


def test_every_parameter_of_a_shot_changes_together_at_the_shot() -> None:
    m = MouldingMachine(period_s=4.0, seed=3)
    per_shot = [r for r in MOULDING_ROLES if r != "screw_position"]
    t = 0.0
    rows: dict[int, dict[str, float | int | bool]] = {}
    while t < 200:
        done = m.shots_done(t)
        row = {r: m.value(r, t) for r in per_shot}
        assert row["shot_counter"] == done
        assert rows.setdefault(done, row) == row  # the same row all through the shot
        t += 0.37
    assert sorted(rows) == list(range(len(rows)))  # every shot seen, one by one
    assert len(rows) > 45
    for k in range(1, len(rows) - 1):  # cycle_time is the shot's real duration
        assert rows[k]["cycle_time"] == pytest.approx(m._ends[k - 1] - m.shot_start(k), abs=1e-3)
        assert 0.9 * 4.0 < float(rows[k]["cycle_time"]) < 1.15 * 4.0


def test_pass_fail_follows_the_parameters() -> None:
    m = MouldingMachine(period_s=4.0, seed=0)
    shots = [m.shot(k).values for k in range(1, 3001)]
    failed = [s for s in shots if not s["pass_fail"]]
    assert 0.01 < len(failed) / len(shots) < 0.15  # a believable scrap rate
    explained = [
        s for s in failed
        if float(s["cushion"]) < MIN_CUSHION
        or float(s["mould_temperature_1"]) < 35.5
        or abs(float(s["injection_pressure"]) - 1450) > 45
    ]  # fmt: skip
    assert len(explained) > 0.7 * len(failed)
    for s in shots:  # a part with a bad parameter is never good
        if float(s["cushion"]) < MIN_CUSHION:
            assert s["pass_fail"] is False


def test_the_screw_moves_between_cushion_and_plasticizing_position() -> None:
    m = MouldingMachine(period_s=4.0, seed=0)
    ts = np.arange(0, 40, 0.05)
    pos = np.array([m.value("screw_position", float(t)) for t in ts])
    assert pos.max() - pos.min() > 40  # it travels
    assert pos.min() > 0.5
    assert pos.max() < 56


def test_two_generators_of_one_machine_agree() -> None:
    spec = SimulateSpec(generator="injection_moulding", role="cushion", period_s=4, seed=1)
    a, b = make_generator(spec, "float"), make_generator(spec, "float")
    assert [a(t) for t in (1.0, 5.0, 9.5)] == [b(t) for t in (9.5, 5.0, 1.0)][::-1]
    other = make_generator(spec.model_copy(update={"seed": 2}), "float")
    assert other(9.5) != a(9.5)


def test_the_press_at_10_hz() -> None:
    p = Press(period_s=2.0, seed=0, fault_period_s=600.0)
    ts = np.arange(0, 60, 0.1)
    v = np.array([p.value("vibration", float(t)) for t in ts])
    spectrum = np.abs(np.fft.rfft(v))
    freqs = np.fft.rfftfreq(len(v), 0.1)
    assert freqs[int(np.argmax(spectrum[1:])) + 1] == pytest.approx(1.3, abs=0.05)
    current = np.array([p.value("motor_current", float(t)) for t in ts])
    assert current.min() > 10
    assert current.max() > 25
    assert p.value("stroke_counter", 59.9) == 29
    assert p.value("fault_level", 100.0) == 0.0  # healthy in the first 40 %
    late = np.arange(560, 600, 0.1)
    v_late = np.array([p.value("vibration", float(t)) for t in late])
    assert float(p.value("fault_level", 599.0)) > 0.9
    assert np.sqrt(np.mean(v_late**2)) > 1.5 * np.sqrt(np.mean(v**2))
    assert p.value("fault_level", 600.5) == 0.0  # repaired


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"generator": "injection_moulding"}, "injection_moulding needs a role, one of: shot_"),
        ({"generator": "press", "role": "cushion"}, "role 'cushion' is not one of press's"),
        ({"generator": "sine", "role": "cushion"}, "role: only for the injection_moulding"),
        ({"generator": "sine", "seed": 2}, "seed: only for the injection_moulding"),
        (
            {"generator": "injection_moulding", "role": "cushion", "fault_period_s": 5.0},
            "fault_period_s: only for the press generator",
        ),
    ],
)
def test_machine_fields_are_checked(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        SimulateSpec.model_validate(fields)
    assert message in str(err.value)


def test_validate_reports_a_wrong_role_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        """\
agent: {id: gw}
devices:
  - name: imm
    protocol: modbus
    host: 127.0.0.1
    port: 5020
    tags:
      - name: cushion
        address: 0
        type: float32
        simulate: {generator: injection_moulding, role: cushon}
"""
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    text = "\n".join(err.value.problems)
    assert "c.yaml:11" in text
    assert "role 'cushon' is not one of injection_moulding's" in text
