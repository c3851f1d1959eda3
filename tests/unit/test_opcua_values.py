"""OPC UA DataValues → RawReadings: null variants, timestamps out of range, status codes
of connection-level failures. Pure code (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from asyncua import ua
from asyncua.ua.status_codes import StatusCodes
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import DriverUnavailable
from drivers.opcua.driver import checked_timestamp, map_error, reading_from_datavalue

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def dv(value: object, vtype: ua.VariantType | None = None, **kw: object) -> ua.DataValue:
    variant = ua.Variant(value, vtype) if vtype is not None else ua.Variant(value)
    return ua.DataValue(variant, **kw)  # type: ignore[arg-type]


def decoded(data: ua.DataValue) -> ua.DataValue:
    """Through asyncua's binary codec, as a DataValue arrives from a server."""
    from asyncua.common.utils import Buffer
    from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

    out: ua.DataValue = struct_from_binary(ua.DataValue, Buffer(struct_to_binary(data)))
    return out


def test_null_variant_with_good_status_is_bad_with_a_reason() -> None:
    r = reading_from_datavalue("t", dv(None, ua.VariantType.Null, SourceTimestamp=NOW))
    assert (r.value, r.quality, r.reason, r.ts_source) == (None, "bad", "null value", NOW)
    # An uncertain null keeps the status code it came with.
    uncertain = ua.StatusCode(StatusCodes.UncertainLastUsableValue)  # type: ignore[arg-type]
    r = reading_from_datavalue("t", dv(None, ua.VariantType.Null, StatusCode=uncertain))
    assert (r.quality, r.reason, r.code) == ("bad", "null value", uncertain.value)
    # A DataValue without any Variant at all.
    r = reading_from_datavalue("t", ua.DataValue())
    assert (r.value, r.quality, r.reason) == (None, "bad", "null value")


def test_datetime_zero_and_max_become_no_timestamp_with_a_reason() -> None:
    zero = decoded(dv(1.5, ua.VariantType.Double, SourceTimestamp=datetime(1601, 1, 1)))
    assert zero.SourceTimestamp is not None
    assert zero.SourceTimestamp.year == 1601  # what asyncua makes of a DateTime of 0
    r = reading_from_datavalue("t", zero)
    assert (r.value, r.quality, r.ts_source) == (1.5, "good", None)
    assert r.reason is not None
    assert r.reason.startswith("ts_source out of range (1601-01-01")
    top = decoded(
        dv(1.5, ua.VariantType.Double, SourceTimestamp=datetime(9999, 12, 31, 23, 59, 59))
    )
    r = reading_from_datavalue("t", top)
    assert r.ts_source is None
    assert r.reason is not None
    assert "9999-12-31" in r.reason
    # A bad reading keeps its status name as reason; the timestamp is still dropped.
    bad = dv(None, ua.VariantType.Null, SourceTimestamp=datetime(1601, 1, 1, tzinfo=UTC))
    bad.StatusCode = ua.StatusCode(StatusCodes.BadNodeIdUnknown)  # type: ignore[arg-type]
    r = reading_from_datavalue("t", bad)
    assert (r.quality, r.reason, r.ts_source) == ("bad", "BadNodeIdUnknown", None)


def test_naive_timestamp_is_utc() -> None:
    naive = dv(2, ua.VariantType.Int32, ServerTimestamp=datetime(2024, 5, 1, 12, 0))
    r = reading_from_datavalue("t", naive, "server")
    assert r.ts_source == NOW
    assert r.ts_source is not None
    assert r.ts_source.tzinfo is not None
    assert r.reason is None


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)))
def test_checked_timestamp_is_aware_and_in_range_or_none_with_reason(ts: datetime) -> None:
    for candidate in (ts, ts.replace(tzinfo=UTC), ts.replace(tzinfo=UTC) + timedelta(0)):
        out, why = checked_timestamp(candidate)
        if out is None:
            assert why is not None
            assert "out of range" in why
        else:
            assert why is None
            assert out.tzinfo is not None
            assert 0 <= out.timestamp() < 253402300799


def test_connection_level_errors_carry_a_status_code() -> None:
    cases = {
        TimeoutError(): StatusCodes.BadTimeout,
        ConnectionRefusedError(): StatusCodes.BadNotConnected,
        ConnectionResetError("reset"): StatusCodes.BadConnectionClosed,
        RuntimeError("odd"): StatusCodes.BadCommunicationError,
    }
    for exc, code in cases.items():
        err = map_error(exc, "opc.tcp://x:4840")
        assert isinstance(err, DriverUnavailable)
        assert err.code == code, (exc, err)


_times = st.none() | st.datetimes(min_value=datetime(1601, 1, 1), max_value=datetime(9999, 12, 31))
_values = (
    st.none()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=10)
    | st.booleans()
)
_codes = st.sampled_from(
    [0, StatusCodes.UncertainLastUsableValue, StatusCodes.BadNodeIdUnknown, 0x00000400]
)


@given(value=_values, code=_codes, src=_times, srv=_times, aware=st.booleans())
def test_any_datavalue_gives_a_consistent_reading(
    value: object, code: int, src: datetime | None, srv: datetime | None, aware: bool
) -> None:
    if aware:
        src = src.replace(tzinfo=UTC) if src is not None else None
        srv = srv.replace(tzinfo=UTC) if srv is not None else None
    data = ua.DataValue(
        ua.Variant(value),
        StatusCode=ua.StatusCode(code),  # type: ignore[arg-type]
        SourceTimestamp=src,  # type: ignore[arg-type]
        ServerTimestamp=srv,  # type: ignore[arg-type]
    )
    for choice in ("source", "server", "agent"):
        r = reading_from_datavalue("t", decoded(data), choice)
        assert r.quality in ("good", "uncertain", "bad")
        if r.value is None:
            assert r.quality == "bad"
            assert r.reason
        if r.quality == "bad":
            assert r.value is None
        if r.ts_source is not None:
            assert r.ts_source.tzinfo is not None
            assert (
                datetime(1970, 1, 1, tzinfo=UTC)
                <= r.ts_source
                < datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
            )
