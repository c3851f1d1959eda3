"""Report by exception: deadbands, quality transitions, heartbeats with the original
timestamps, and a consumer's sample-and-hold reconstruction within the band."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.derive.config import ReportConfig
from agent.derive.report import ExceptionFilter
from agent.schema import WireSample

T0 = datetime(2026, 12, 1, 11, 0, 0, tzinfo=UTC)


def s(
    value: object, i: int = 0, quality: str = "good", reason: str | None = None, tag: str = "p"
) -> WireSample:
    return {
        "device": "d",
        "tag": tag,
        "value": value,  # type: ignore[typeddict-item]
        "quality": quality,  # type: ignore[typeddict-item]
        "reason": reason,
        "code": None,
        "ts_source": T0 + timedelta(seconds=i, milliseconds=5),
        "ts_agent": T0 + timedelta(seconds=i),
        "unit": "bar",
        "seq": 0,
    }


def values(out: list[WireSample]) -> list[object]:
    return [x["value"] for x in out]


def test_first_value_and_absolute_deadband_against_the_last_published() -> None:
    f = ExceptionFilter({"p": ReportConfig(deadband_abs=1.0)})
    sent = []
    for i, v in enumerate([10.0, 10.5, 10.9, 11.1, 11.5, 12.2, 9.0]):
        sent += f.filter([s(v, i)], float(i))
    # 10.5, 10.9 within 1 of 10; 11.1 beyond; 11.5 within 1 of 11.1 (not of 10.9)
    assert values(sent) == [10.0, 11.1, 12.2, 9.0]
    assert f.suppressed == 3


def test_percent_deadband_and_the_larger_band_wins() -> None:
    f = ExceptionFilter({"p": ReportConfig(deadband_pct=10.0, deadband_abs=0.5)})
    sent = []
    for i, v in enumerate([100.0, 109.0, 111.0, 111.4, 0.0, 0.4, 0.6]):
        sent += f.filter([s(v, i)], float(i))
    assert values(sent) == [100.0, 111.0, 0.0, 0.6]


def test_on_change_for_numbers_bools_text_and_a_change_of_type() -> None:
    f = ExceptionFilter({"p": ReportConfig()})
    seq: list[object] = [1, 1, 2, 2, True, True, "a", "a", "b", 1.0, 1.0]
    sent = []
    for i, v in enumerate(seq):
        sent += f.filter([s(v, i)], float(i))
    assert values(sent) == [1, 2, True, "a", "b", 1.0]


def test_quality_transitions_always_go_out_and_bad_is_not_repeated() -> None:
    f = ExceptionFilter({"p": ReportConfig(deadband_abs=100.0)})
    polls = [
        s(5.0, 0),
        s(None, 1, "bad", "timeout"),
        s(None, 2, "bad", "timeout"),
        s(None, 3, "bad", "unreachable"),
        s(5.0, 4),
        s(6.0, 5, "uncertain", "sensor"),
    ]
    sent = []
    for i, x in enumerate(polls):
        sent += f.filter([x], float(i))
    assert [(x["quality"], x["reason"]) for x in sent] == [
        ("good", None),
        ("bad", "timeout"),
        ("bad", "unreachable"),
        ("good", None),
        ("uncertain", "sensor"),
    ]


def test_the_heartbeat_repeats_the_last_published_sample_with_its_own_timestamps() -> None:
    f = ExceptionFilter({"p": ReportConfig(deadband_abs=1.0, max_interval_s=10.0)})
    first = s(20.0, 0)
    out = f.filter([first], 0.0)
    assert out == [first]
    assert f.filter([s(20.2, 5)], 5.0) == []
    (repeat,) = f.filter([s(20.3, 10)], 10.0)
    assert repeat["repeat"] is True
    assert repeat["value"] == 20.0
    assert repeat["ts_agent"] == first["ts_agent"]
    assert repeat["ts_source"] == first["ts_source"]
    assert repeat is not first
    assert "repeat" not in first
    assert f.filter([s(20.1, 15)], 15.0) == []  # the next heartbeat is due at 20
    assert values(f.filter([s(20.4, 20)], 20.0)) == [20.0]
    # a real change resets the heartbeat
    assert values(f.filter([s(25.0, 21)], 21.0)) == [25.0]
    assert f.filter([s(25.0, 30)], 30.0) == []
    assert f.repeats == 2


def test_tags_without_a_config_pass_untouched() -> None:
    f = ExceptionFilter({"p": ReportConfig(mode="every_poll")})
    assert not f.active
    poll = [s(1.0), s(1.0, tag="q")]
    assert f.filter(poll, 0.0) is poll


signal = st.lists(
    st.one_of(
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False),
        st.none(),  # a bad reading
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(
    signal,
    st.floats(min_value=0, max_value=50),
    st.floats(min_value=0, max_value=20),
    st.one_of(st.none(), st.floats(min_value=1, max_value=30)),
)
def test_sample_and_hold_reconstruction_stays_within_the_band(
    readings: list[float | None], band_abs: float, band_pct: float, heartbeat: float | None
) -> None:
    cfg = ReportConfig(deadband_abs=band_abs, deadband_pct=band_pct, max_interval_s=heartbeat)
    f = ExceptionFilter({"p": cfg})
    held: WireSample | None = None
    for i, v in enumerate(readings):
        x = s(v, i) if v is not None else s(None, i, "bad", "timeout")
        for out in f.filter([x], float(i)):
            if out.get("repeat"):
                assert held is not None
                assert out["value"] == held["value"]
                assert out["ts_agent"] == held["ts_agent"]  # never a new timestamp
            held = out
        assert held is not None  # the first reading always goes out
        # The consumer's view now: same quality, and a good value within the band.
        assert held["quality"] == x["quality"]
        if v is not None:
            last = held["value"]
            assert isinstance(last, float)
            assert abs(v - last) <= max(band_abs, band_pct / 100 * abs(last)) + 1e-9


def test_the_bench_mix_is_reconstructed_within_every_band() -> None:
    from bench.derive_rbe import run

    result = run(300)
    assert result["quality_mismatches"] == 0
    assert all(v <= 1.0 for v in result["max_error_over_band"].values()), result
    assert result["max_error_over_band"]["counter"] == 0.0
    assert result["rbe_samples"] < result["raw_samples"]
