"""OPC UA config models, status mapping, value conversion and certificates (no network)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.base import DriverConfigError
from drivers.opcua import certs
from drivers.opcua.cli import add_opcua_commands
from drivers.opcua.config import OpcUaDevice, OpcUaTag, parse_browse_path, parse_node_id


def dev(**extra: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "name": "oven",
        "protocol": "opcua",
        "endpoint": "opc.tcp://10.0.0.5:4840",
        "tags": [{"name": "t", "node_id": "ns=2;s=T"}],
    }
    data.update(extra)
    return OpcUaDevice.model_validate(data)


@pytest.mark.parametrize(
    ("text", "ns", "uri", "kind", "ident"),
    [
        ("ns=3;s=Oven.Temp", 3, None, "s", "Oven.Temp"),
        ("ns=2;i=1001", 2, None, "i", "1001"),
        ("nsu=urn:acme:oven;s=Temp", None, "urn:acme:oven", "s", "Temp"),
        ("i=2258", 0, None, "i", "2258"),
        ("ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a", 1, None, "g", None),
    ],
)
def test_node_ids(text: str, ns: int | None, uri: str | None, kind: str, ident: str | None) -> None:
    p = parse_node_id(text)
    assert (p.ns_index, p.ns_uri, p.kind) == (ns, uri, kind)
    if ident is not None:
        assert p.identifier == ident


@pytest.mark.parametrize("text", ["ns=2;x=1", "ns=2;i=abc", "s=", "Oven.Temp", "ns=99999;s=a"])
def test_bad_node_ids(text: str) -> None:
    with pytest.raises(ValueError, match="node_id"):
        parse_node_id(text)


def test_browse_path_with_uris() -> None:
    els = parse_browse_path("0:Objects/{http://acme.com/oven}Oven/2:Temperature")
    assert [(e.ns_index, e.ns_uri, e.name) for e in els] == [
        (0, None, "Objects"),
        (None, "http://acme.com/oven", "Oven"),
        (2, None, "Temperature"),
    ]
    with pytest.raises(ValueError, match="element 'Oven'"):
        parse_browse_path("0:Objects/Oven")


def test_tag_needs_exactly_one_address() -> None:
    with pytest.raises(ValidationError, match="exactly one of node_id and browse_path"):
        OpcUaTag.model_validate({"name": "t"})
    with pytest.raises(ValidationError, match="exactly one of node_id and browse_path"):
        OpcUaTag.model_validate({"name": "t", "node_id": "i=1", "browse_path": "0:Objects"})
    with pytest.raises(ValidationError, match="type Structure needs 'fields'"):
        OpcUaTag.model_validate({"name": "t", "node_id": "i=1", "type": "Structure"})


def test_security_settings() -> None:
    assert dev().resolved_security_mode() == "None"
    assert dev(security_policy="Basic256Sha256").resolved_security_mode() == "SignAndEncrypt"
    with pytest.raises(ValidationError, match="needs a security_policy"):
        dev(security_mode="Sign")
    with pytest.raises(ValidationError, match="Input should be 'None', 'Basic256Sha256'"):
        dev(security_policy="Basic128Rsa15")
    with pytest.raises(ValidationError, match="give both username and password"):
        dev(username="op")
    d = dev(username="op", password="secret")
    assert "secret" not in repr(d)
    assert d.password is not None
    assert d.password.get_secret_value() == "secret"


def test_thumbprint_normalised() -> None:
    sha1 = "AB:" * 19 + "AB"
    assert dev(server_certificate_thumbprint=sha1).server_certificate_thumbprint == "ab" * 20
    with pytest.raises(ValidationError, match="40 \\(SHA-1\\) or 64"):
        dev(server_certificate_thumbprint="abc")


def test_group_modes_and_options() -> None:
    d = dev(
        mode="poll",
        subscription={"queue_size": 5},
        poll_groups={
            "fast": {"interval_s": 0.1, "mode": "subscribe"},
            "slow": {
                "interval_s": 10,
                "subscription": {"deadband": {"type": "percent", "value": 2}},
            },
        },
    )
    assert (d.group_mode("default"), d.group_mode("fast"), d.group_mode("slow")) == (
        "poll",
        "subscribe",
        "poll",
    )
    assert d.group_subscription("fast").queue_size == 5
    slow = d.group_subscription("slow").deadband
    assert slow is not None
    assert (slow.type, slow.value) == ("percent", 2)
    assert d.group_intervals() == {"default": 1.0, "fast": 0.1, "slow": 10}
    with pytest.raises(ValidationError, match="between 0 and 100"):
        dev(subscription={"deadband": {"type": "percent", "value": 150}})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        dev(poll_groups={"fast": {"interval_s": 1, "mod": "subscribe"}})


def test_endpoint_must_be_opc_tcp() -> None:
    with pytest.raises(ValidationError, match="endpoint"):
        dev(endpoint="http://10.0.0.5:4840")


# --------------------------------------------------------------- status and values


def test_quality_from_status_codes() -> None:
    from drivers.opcua.driver import quality_of

    assert quality_of(0) == ("good", None, None)
    assert quality_of(0x80340000) == ("bad", "BadNodeIdUnknown", 0x80340000)
    assert quality_of(0x408F0000)[0:2] == ("uncertain", "UncertainNoCommunicationLastUsableValue")
    # Info bits (overflow, limits) do not hide the code's name.
    assert quality_of(0x80340400)[1] == "BadNodeIdUnknown"


def test_values_and_datavalues() -> None:
    import dataclasses
    from datetime import UTC, datetime

    from asyncua import ua as typed_ua

    from drivers.opcua.driver import convert_value, reading_from_datavalue

    # asyncua annotates its fields with its own wrapper classes; plain values are what
    # it uses at run time.
    ua: Any = typed_ua

    @dataclasses.dataclass
    class Recipe:
        name: str
        setpoint: float
        steps: list[int]

    assert convert_value([1, 2]) == [1, 2]
    assert convert_value(ua.LocalizedText("hi")) == "hi"
    assert convert_value(Recipe("bake", 180.0, [1, 2])) == {
        "name": "bake",
        "setpoint": 180.0,
        "steps": [1, 2],
    }
    src = datetime(2024, 1, 1, tzinfo=UTC)
    srv = datetime(2024, 1, 2, tzinfo=UTC)
    dv = ua.DataValue(
        ua.Variant(1.5, ua.VariantType.Double),
        StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure),
        SourceTimestamp=src,
        ServerTimestamp=srv,
    )
    r = reading_from_datavalue("t", dv)
    assert (r.value, r.quality, r.reason, r.ts_source) == (None, "bad", "BadSensorFailure", src)
    ok = ua.DataValue(
        ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=src, ServerTimestamp=srv
    )
    assert reading_from_datavalue("t", ok, "server").ts_source == srv
    assert reading_from_datavalue("t", ok, "agent").ts_source is None
    raw = ua.DataValue(ua.Variant(ua.ExtensionObject(ua.NodeId(5001, 2), b"\x00")))
    unknown = reading_from_datavalue("t", raw)
    assert (unknown.quality, unknown.reason, unknown.value) == ("bad", "StructureTypeUnknown", None)


# ------------------------------------------------------------------- certificates


def test_client_certificate_generated_once(tmp_path: Path) -> None:
    paths = certs.ensure_own_certificate(tmp_path, "urn:test:client")
    der = paths.cert.read_bytes()
    assert certs.application_uri_of(der) == "urn:test:client"
    assert paths.key.stat().st_mode & 0o077 == 0
    again = certs.ensure_own_certificate(tmp_path, "urn:test:client")
    assert again.cert.read_bytes() == der
    with pytest.raises(DriverConfigError, match="carries ApplicationUri 'urn:test:client'"):
        certs.ensure_own_certificate(tmp_path, "urn:other")


def test_trust_by_directory_or_thumbprint(tmp_path: Path) -> None:
    der = certs.ensure_own_certificate(tmp_path / "a", "urn:a").cert.read_bytes()
    trust = tmp_path / "trusted"
    assert not certs.is_trusted(der, trust)
    assert certs.is_trusted(der, trust, certs.sha1_thumbprint(der))
    assert certs.is_trusted(der, trust, certs.sha256_thumbprint(der))
    assert not certs.is_trusted(der, trust, "0" * 40)
    certs.trust_certificate(der, trust)
    assert certs.is_trusted(der, trust)


def test_cli_cert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="edge-agent")
    add_opcua_commands(parser.add_subparsers())
    args = parser.parse_args(["opcua", "cert", "--cert-dir", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    der = (tmp_path / "own" / "cert.der").read_bytes()
    assert f"sha1: {certs.sha1_thumbprint(der)}" in out
    assert f"sha256: {certs.sha256_thumbprint(der)}" in out
    args = parser.parse_args(["opcua", "browse", "opc.tcp://h:4840", "--format", "yaml"])
    assert (args.root, args.depth, args.format) == ("i=85", 3, "yaml")


def test_example_config_validates() -> None:
    from drivers.opcua.simulator import load_devices

    root = Path(__file__).resolve().parents[2]
    (oven,) = load_devices(root / "configs" / "opcua-oven.yaml")
    assert oven.resolved_security_mode() == "SignAndEncrypt"
    assert oven.group_mode("fast") == "subscribe"
    assert oven.group_mode("default") == "poll"
    assert {t.type for t in oven.tags} >= {"Structure", "Float"}
    assert any(t.array_length for t in oven.tags)
