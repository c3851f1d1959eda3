"""Window features: equal to numpy on the same data; windows, quality and edge cases."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.derive.config import FEATURES, WindowConfig
from agent.derive.moments import Moments
from agent.derive.windows import Window
from agent.schema import WireSample


def reference(x: np.ndarray, feature: str) -> float | None:
    """numpy's value of a feature (scipy.stats' conventions for skew and kurtosis,
    written out: scipy is not a dependency)."""
    n = len(x)
    mean = float(np.mean(x))
    m2 = float(np.mean((x - mean) ** 2))
    rms = float(np.sqrt(np.mean(x**2)))
    if feature == "count":
        return n
    if feature == "mean":
        return mean
    if feature == "min":
        return float(np.min(x))
    if feature == "max":
        return float(np.max(x))
    if feature == "std":
        return float(np.std(x))  # population, ddof=0
    if feature == "rms":
        return rms
    if feature == "peak_to_peak":
        return float(np.ptp(x))
    if feature == "crest_factor":
        return float(np.max(np.abs(x)) / rms) if rms > 0 else None
    if m2 == 0:
        return None
    with np.errstate(all="ignore"):  # a tiny spread underflows; close() skips those
        if feature == "skewness":
            return float(np.mean((x - mean) ** 3) / m2**1.5)
        if feature == "kurtosis":
            return float(np.mean((x - mean) ** 4) / m2**2 - 3)
    raise KeyError(feature)


def close(got: float | int | None, want: float | None, x: np.ndarray, feature: str) -> bool:
    # Relative to the data's scale: a moment of order k is exact to ~eps × scale^k.
    scale = float(np.max(np.abs(x))) or 1.0
    spread = float(np.std(x))
    if feature in ("skewness", "kurtosis") and (spread < 1e-6 * scale or spread < 1e-70):
        # The shape of a (nearly) constant signal is rounding noise on both sides (numpy
        # gives 1.0 for five equal values whose mean it rounds); ours is None or finite.
        return got is None or math.isfinite(got)
    if want is None or got is None:
        return got is want
    tol = 1e-9 * max(abs(want), 1.0) + 1e-9 * scale
    if feature in ("skewness", "kurtosis", "crest_factor"):
        tol = 1e-6 * max(abs(want), 1.0)
    return abs(got - want) <= tol


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite, min_size=1, max_size=200))
def test_running_moments_equal_numpy(values: list[float]) -> None:
    m = Moments()
    for v in values:
        m.add(v)
    x = np.array(values, dtype=float)
    for feature in FEATURES:
        assert close(m.feature(feature), reference(x, feature), x, feature), feature


def test_moments_on_a_vibration_like_signal_at_10_hz() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(600) / 10
    x = 0.3 * np.sin(2 * np.pi * 1.7 * t) + rng.normal(0, 0.05, len(t)) + 2.0
    m = Moments()
    for v in x:
        m.add(float(v))
    for feature in FEATURES:
        want = reference(x, feature)
        assert want is not None
        assert m.feature(feature) == pytest.approx(want, rel=1e-10, abs=1e-12), feature


def test_constant_and_zero_signals_have_no_shape() -> None:
    m = Moments()
    for _ in range(5):
        m.add(3.0)
    assert m.feature("std") == 0.0
    assert m.feature("skewness") is None
    assert m.feature("kurtosis") is None
    z = Moments()
    z.add(0.0)
    z.add(0.0)
    assert z.feature("crest_factor") is None
    assert Moments().feature("count") == 0
    assert Moments().feature("mean") is None


T0 = datetime(2026, 12, 1, 11, 0, 0, tzinfo=UTC)


def sample(tag: str, value: object, ts: datetime, quality: str = "good") -> WireSample:
    return {
        "device": "press",
        "tag": tag,
        "value": value,  # type: ignore[typeddict-item]
        "quality": quality,  # type: ignore[typeddict-item]
        "reason": None if quality == "good" else "timeout",
        "code": None,
        "ts_source": None,
        "ts_agent": ts,
        "unit": "g",
        "seq": 0,
    }


def by_tag(record: list[WireSample]) -> dict[str, WireSample]:
    return {s["tag"]: s for s in record}


def run(window: Window, polls: list[list[WireSample]]) -> list[list[WireSample]]:
    out: list[list[WireSample]] = []
    for poll in polls:
        out += window.add(poll)
    return out


def test_time_windows_align_to_the_wall_clock_and_match_numpy() -> None:
    cfg = WindowConfig(tags=["vib"], length_s=1.0, features=list(FEATURES))
    w = Window("press", cfg, {"vib": "g"})
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, 35)
    # 10 Hz from 0.45 s past a second: the first window is partial, then whole ones.
    start = T0 + timedelta(seconds=0.45)
    polls = [
        [sample("vib", float(v), start + timedelta(seconds=i / 10))] for i, v in enumerate(values)
    ]
    records = run(w, polls)
    assert len(records) == 3  # [0.45, 1) partial, [1, 2), [2, 3); [3, 3.85) still open
    first, second = by_tag(records[0]), by_tag(records[1])
    assert first["vib.mean"]["quality"] == "uncertain"
    assert first["vib.mean"]["reason"] == "partial window"
    assert first["vib.count"]["value"] == 6
    assert second["vib.mean"]["quality"] == "good"
    assert second["vib.mean"]["reason"] is None
    assert second["vib.mean"]["window_start"] == T0 + timedelta(seconds=1)
    assert second["vib.mean"]["ts_agent"] == T0 + timedelta(seconds=2)
    assert second["vib.mean"]["unit"] == "g"
    assert second["vib.kurtosis"]["unit"] is None
    assert second["vib.good_share"]["value"] == 1.0
    x = values[6:16]
    for feature in FEATURES:
        got = second[f"vib.{feature}"]["value"]
        want = reference(x, feature)
        assert isinstance(got, int | float)
        assert want is not None
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), feature


def test_nan_and_a_device_down_mid_window_lower_the_share() -> None:
    cfg = WindowConfig(tags=["vib"], length_samples=5, features=["count", "mean"])
    w = Window("press", cfg, {})
    polls = [
        [sample("vib", 1.0, T0)],
        [sample("vib", None, T0 + timedelta(seconds=0.1), "bad")],  # a NaN, made bad
        [sample("vib", 3.0, T0 + timedelta(seconds=0.2))],
        [sample("vib", None, T0 + timedelta(seconds=0.3), "bad")],  # device down
        [sample("vib", float("nan"), T0 + timedelta(seconds=0.4))],  # NaN reaching us good
    ]
    (record,) = run(w, polls)
    got = by_tag(record)
    assert got["vib.mean"]["value"] == 2.0
    assert got["vib.mean"]["quality"] == "uncertain"
    assert got["vib.mean"]["reason"] == "3 of 5 readings not good"
    assert got["vib.count"]["value"] == 2
    assert got["vib.good_share"]["value"] == pytest.approx(0.4)
    assert got["vib.mean"]["window_start"] == T0
    assert got["vib.mean"]["ts_agent"] == T0 + timedelta(seconds=0.4)


def test_a_window_without_good_readings_is_bad_and_undefined_features_are_null() -> None:
    cfg = WindowConfig(tags=["a", "b"], length_s=1.0, features=["count", "mean", "skewness"])
    w = Window("press", cfg, {})
    polls = [
        [sample("a", None, T0, "bad"), sample("b", 5.0, T0)],
        [
            sample("a", None, T0 + timedelta(seconds=0.5), "bad"),
            sample("b", 5.0, T0 + timedelta(seconds=0.5)),
        ],
        [sample("b", 1.0, T0 + timedelta(seconds=1))],
    ]
    (record,) = run(w, polls)
    got = by_tag(record)
    assert got["a.mean"]["value"] is None
    assert got["a.mean"]["quality"] == "bad"
    assert got["a.mean"]["reason"] == "no good readings"
    assert got["a.count"]["value"] == 0
    assert got["a.good_share"]["value"] == 0.0
    assert got["b.mean"]["value"] == 5.0
    assert got["b.skewness"]["value"] is None
    assert got["b.skewness"]["reason"] == "undefined for a constant signal"


def test_a_clock_going_back_cuts_the_window_and_a_jump_forward_skips_empty_ones() -> None:
    cfg = WindowConfig(tags=["v"], length_s=10.0, features=["count"])
    w = Window("press", cfg, {})
    records = run(
        w,
        [
            [sample("v", 1.0, T0 + timedelta(seconds=1))],
            [sample("v", 2.0, T0 + timedelta(seconds=12))],  # closes [0, 10) partial
            [sample("v", 3.0, T0 + timedelta(seconds=3))],  # the clock went back
            [sample("v", 4.0, T0 + timedelta(hours=2))],  # and far forward
        ],
    )
    assert [by_tag(r)["v.count"]["reason"] for r in records] == [
        "partial window",
        "clock jump",
        "partial window",
    ]
    assert [by_tag(r)["v.count"]["value"] for r in records] == [1, 1, 1]
    assert by_tag(records[2])["v.count"]["window_start"] == T0


def test_restart_mid_window_starts_a_partial_one() -> None:
    cfg = WindowConfig(tags=["v"], length_s=1.0, features=["mean"])
    first = Window("press", cfg, {})
    first.add([sample("v", 1.0, T0 + timedelta(seconds=0.2))])
    restarted = Window("press", cfg, {})  # nothing of a window is persisted
    records = run(
        restarted,
        [
            [sample("v", 5.0, T0 + timedelta(seconds=0.7))],
            [sample("v", 0.0, T0 + timedelta(seconds=1.1))],
        ],
    )
    (record,) = records
    assert by_tag(record)["v.mean"]["value"] == 5.0
    assert by_tag(record)["v.mean"]["reason"] == "partial window"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(finite, st.none()), min_size=1, max_size=60),
    st.integers(min_value=2, max_value=9),
)
def test_sample_windows_partition_the_readings(values: list[float | None], n: int) -> None:
    cfg = WindowConfig(tags=["v"], length_samples=n, features=["count", "mean"])
    w = Window("press", cfg, {})
    polls = [
        [sample("v", v, T0 + timedelta(seconds=i), "good" if v is not None else "bad")]
        for i, v in enumerate(values)
    ]
    records = run(w, polls)
    assert len(records) == len(values) // n
    for k, record in enumerate(records):
        chunk = [v for v in values[k * n : (k + 1) * n] if v is not None]
        got = by_tag(record)
        assert got["v.count"]["value"] == len(chunk)
        assert got["v.good_share"]["value"] == pytest.approx(len(chunk) / n)
        if chunk:
            assert got["v.mean"]["value"] == pytest.approx(
                float(np.mean(chunk)), rel=1e-9, abs=1e-6
            )
        else:
            assert got["v.mean"]["value"] is None
        assert not any(isinstance(s["value"], float) and math.isnan(s["value"]) for s in record)


def test_a_clock_tick_closes_a_window_nobody_reads_any_more() -> None:
    cfg = WindowConfig(tags=["v"], length_s=1.0, features=["count"])
    w = Window("press", cfg, {})
    assert w.add([sample("v", 1.0, T0 + timedelta(seconds=0.5))]) == []
    assert w.add([], T0 + timedelta(seconds=0.9)) == []  # not over yet
    assert w.add([], T0 - timedelta(seconds=30)) == []  # a clock gone back: a reading tells
    (record,) = w.add([], T0 + timedelta(seconds=1.2))  # the device went silent
    assert by_tag(record)["v.count"]["ts_agent"] == T0 + timedelta(seconds=1)
    assert w.add([], T0 + timedelta(seconds=5)) == []  # nothing read: nothing published
    (later,) = run(
        w,
        [
            [sample("v", 2.0, T0 + timedelta(seconds=7.5))],
            [sample("v", 3.0, T0 + timedelta(seconds=8))],
        ],
    )
    got = by_tag(later)["v.count"]
    assert (got["value"], got["quality"], got["reason"]) == (1, "good", None)  # not partial
    assert w.closed == 2
