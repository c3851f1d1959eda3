"""OpcUaDriver.write against our simulator and against a plain asyncua server (read
back by asyncua's own client), refusals, server status codes, faults."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError

from drivers.base import DriverConfigError, DriverError, DriverUnavailable, WriteRefused
from drivers.opcua.config import OpcUaDevice
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.simulator import OpcUaSimulator
from tests.support.faults import FaultPlan, Faulty, Garbage, Hang, Raise
from tests.support.proxy import FaultProxy
from tests.support.readback import values

pytestmark = pytest.mark.integration


def f32(value: float) -> float:
    return cast(float, struct.unpack(">f", struct.pack(">f", value))[0])


# type → (simulated start value, value written): every written value differs.
CASES: dict[str, tuple[Any, Any]] = {
    "Boolean": (False, True),
    "SByte": (1, -128),
    "Byte": (1, 255),
    "Int16": (1, -32768),
    "UInt16": (1, 65535),
    "Int32": (1, -(2**31)),
    "UInt32": (1, 2**32 - 1),
    "Int64": (1, -(2**63)),
    "UInt64": (1, 2**64 - 1),
    "Float": (1.5, f32(-1234.5678)),
    "Double": (1.5, math.pi * 1e200),
    "String": ("a", "Rezept 7 / ß"),
}


def device(tmp_path: Path, tags: list[dict[str, Any]], **extra: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "name": "oven",
        "protocol": "opcua",
        "endpoint": "opc.tcp://127.0.0.1:0/sim",
        "cert_dir": str(tmp_path / "client"),
        "watchdog_interval_s": 0.5,
        "timeout_s": 2.0,
        "tags": tags,
    }
    data.update(extra)
    return OpcUaDevice.model_validate(data)


def at(dev: OpcUaDevice, endpoint: str) -> OpcUaDevice:
    return dev.model_copy(update={"endpoint": endpoint})


def typed_tags() -> list[dict[str, Any]]:
    return [
        {
            "name": t,
            "node_id": f"ns=2;s=Oven.{t}",
            "type": t,
            "simulate": {"generator": "constant", "value": start},
        }
        for t, (start, _) in CASES.items()
    ]


TOO_MANY = UaStatusCodeError(StatusCodes.BadTooManyOperations)  # type: ignore[no-untyped-call]


def status(code: int) -> ua.StatusCode:
    return ua.StatusCode(cast(Any, code))


def sid(name: str, ns: int) -> ua.NodeId:
    return ua.NodeId.from_string(f"ns={ns};s={name}")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[OpcUaSimulator, OpcUaDriver]]:
    tags = [
        *typed_tags(),
        {"name": "locked", "node_id": "ns=2;s=Oven.Locked", "type": "Int32"},
        {"name": "ramp", "node_id": "ns=2;s=Oven.Ramp", "type": "Double",
         "simulate": {"generator": "ramp", "min": 0, "max": 100, "period_s": 1}},
    ]  # fmt: skip
    dev = device(tmp_path, tags)
    async with OpcUaSimulator(
        [dev],
        cert_dir=tmp_path / "sim",
        update_interval_s=0.05,
        read_only={"oven": {"locked"}},
    ) as sim:
        driver = OpcUaDriver(at(dev, sim.endpoints["oven"]))
        await driver.connect()
        try:
            yield sim, driver
        finally:
            await driver.close()


async def test_every_scalar_type_reads_back_exactly_what_was_written(
    served: tuple[OpcUaSimulator, OpcUaDriver],
) -> None:
    sim, driver = served
    before = await values(driver)
    for name, (start, written) in CASES.items():
        assert before[name] == start
        await driver.write(name, written)
    after = await values(driver)
    for name, (_, written) in CASES.items():
        assert after[name] == written, name
        assert type(after[name]) is type(written), name
    assert sim.write_count("oven") == len(CASES)
    # An int is a valid raw value of a float type (the command layer's inverse scaling
    # may produce one); it is sent as the node's type.
    await driver.write("Double", 3)
    await driver.write("Float", -2)
    after = await values(driver)
    assert (after["Double"], after["Float"]) == (3.0, -2.0)
    assert type(after["Double"]) is float


async def test_a_written_value_stays_although_the_simulator_drives_the_node(
    served: tuple[OpcUaSimulator, OpcUaDriver],
) -> None:
    _, driver = served
    await driver.write("ramp", 42.25)
    for _ in range(5):  # several simulator rounds (update_interval_s 0.05)
        await asyncio.sleep(0.05)
        assert (await values(driver))["ramp"] == 42.25


REFUSED: list[tuple[str, Any, str, str]] = [
    ("Boolean", 1, "value does not fit", "Boolean needs true or false"),
    ("SByte", 128, "value does not fit", "outside SByte (-128..127)"),
    ("Byte", -1, "value does not fit", "outside Byte"),
    ("UInt64", 2**64, "value does not fit", "outside UInt64"),
    ("Int32", 1.0, "value does not fit", "Int32 needs an integer"),
    ("Int16", True, "value does not fit", "Int16 needs a number"),
    ("Float", 1e39, "value does not fit", "outside Float"),
    ("Float", math.nan, "value does not fit", "not a finite number"),
    ("Double", -math.inf, "value does not fit", "not a finite number"),
    ("Double", "1.5", "value does not fit", "Double needs a number"),
    ("String", 5, "value does not fit", "String needs a string"),
    ("nope", 1, "unknown tag", "no tag 'nope'"),
]


async def test_values_the_node_cannot_hold_are_refused_before_any_write(
    served: tuple[OpcUaSimulator, OpcUaDriver],
) -> None:
    sim, driver = served
    for tag, raw, reason, says in REFUSED:
        with pytest.raises(WriteRefused) as caught:
            await driver.write(tag, raw)
        assert (caught.value.reason, tag) == (reason, tag)
        assert says in caught.value.detail, tag
    assert sim.write_count("oven") == 0


def test_structures_and_arrays_are_refused_by_the_config(tmp_path: Path) -> None:
    dev = device(
        tmp_path,
        [
            {"name": "arr", "node_id": "ns=2;s=Oven.Arr", "type": "Int16", "array_length": 3},
            {"name": "rec", "node_id": "ns=2;s=Oven.Rec", "type": "Structure",
             "fields": {"a": "Int16"}},
            {"name": "plain", "node_id": "ns=2;s=Oven.Plain"},
        ],
    )  # fmt: skip
    assert dev.write_refusal("arr") == "an array cannot be written (one write is one scalar value)"
    assert dev.write_refusal("rec") == (
        "a structure cannot be written (one write is one scalar value)"
    )
    assert dev.write_refusal("plain") is None
    assert dev.write_refusal("nope") == "no tag 'nope' on device 'oven'"


async def test_a_refused_tag_is_refused_without_a_connection(tmp_path: Path) -> None:
    dev = device(
        tmp_path,
        [{"name": "arr", "node_id": "ns=2;s=Oven.Arr", "type": "Int16", "array_length": 3}],
    )
    with pytest.raises(WriteRefused) as caught:
        await OpcUaDriver(dev).write("arr", 1)
    assert caught.value.reason == "not writable"
    assert caught.value.detail == "arr: an array cannot be written (one write is one scalar value)"


async def test_a_read_only_node_is_refused_by_the_server_with_its_status(
    served: tuple[OpcUaSimulator, OpcUaDriver],
) -> None:
    sim, driver = served
    with pytest.raises(DriverError) as caught:
        await driver.write("locked", 5)
    assert not isinstance(caught.value, DriverUnavailable | WriteRefused)
    # asyncua's server answers BadUserAccessDenied for a node whose AccessLevel lacks
    # CurrentWrite (the specification's BadNotWritable would be more precise).
    assert caught.value.reason == "BadUserAccessDenied"
    assert caught.value.code == StatusCodes.BadUserAccessDenied
    assert sim.write_count("oven") == 0
    await driver.write("Int16", 7)  # the session is fine
    assert (await values(driver))["Int16"] == 7


async def test_a_node_the_server_does_not_have_is_bad_node_id_unknown(tmp_path: Path) -> None:
    served_dev = device(tmp_path, typed_tags()[:1])
    configured = device(
        tmp_path, [*typed_tags()[:1], {"name": "gone", "node_id": "ns=2;s=Oven.Gone"}]
    )
    async with OpcUaSimulator([served_dev], cert_dir=tmp_path / "sim") as sim:
        driver = OpcUaDriver(at(configured, sim.endpoints["oven"]))
        await driver.connect()
        try:
            with pytest.raises(DriverError) as caught:
                await driver.write("gone", 1.0)
        finally:
            await driver.close()
    assert caught.value.reason == "BadNodeIdUnknown"


async def test_an_unresolved_browse_path_is_a_config_error(tmp_path: Path) -> None:
    served_dev = device(tmp_path, typed_tags()[:1])
    configured = device(
        tmp_path,
        [*typed_tags()[:1], {"name": "gone", "browse_path": "0:Objects/2:Nowhere/2:Gone"}],
    )
    async with OpcUaSimulator([served_dev], cert_dir=tmp_path / "sim") as sim:
        driver = OpcUaDriver(at(configured, sim.endpoints["oven"]))
        await driver.connect()
        try:
            with pytest.raises(DriverConfigError) as caught:
                await driver.write("gone", 1.0)
        finally:
            await driver.close()
    assert caught.value.reason.startswith("Bad")


async def test_the_data_type_is_read_once_per_session(
    served: tuple[OpcUaSimulator, OpcUaDriver],
) -> None:
    _, driver = served
    calls = driver.read_calls
    await driver.write("Int16", 1)
    first = driver.read_calls - calls
    for v in range(2, 6):
        await driver.write("Int16", v)
    assert first == 2  # DataType and ValueRank
    assert driver.read_calls - calls == first  # none for the later writes
    await driver.connect()  # a new session reads it again
    calls = driver.read_calls
    await driver.write("Int16", 9)
    assert driver.read_calls - calls == 2


# ------------------------------------------------------------------ faults


async def test_write_before_connect_and_after_close_is_driver_unavailable(tmp_path: Path) -> None:
    driver = OpcUaDriver(device(tmp_path, typed_tags()))
    with pytest.raises(DriverUnavailable, match="not connected"):
        await driver.write("Int16", 1)


async def test_the_connection_lost_mid_write_is_driver_unavailable(tmp_path: Path) -> None:
    dev = device(tmp_path, typed_tags(), timeout_s=0.5)
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        port = int(sim.endpoints["oven"].rsplit(":", 1)[1].split("/")[0])
        with FaultProxy("127.0.0.1", port) as proxy:
            driver = OpcUaDriver(at(dev, f"opc.tcp://127.0.0.1:{proxy.port}/sim"))
            await driver.connect()
            try:
                await driver.write("Int16", 1)  # the DataType is known from here on
                proxy.set_mode("blackhole")
                with pytest.raises(DriverUnavailable) as silent:
                    await driver.write("Int16", 2)
                await driver.close()
                proxy.set_mode("pass")
                await driver.connect()
                await driver.write("Int16", 3)
                proxy.set_mode("cut")
                with pytest.raises(DriverUnavailable) as cut:
                    await driver.write("Int16", 4)
            finally:
                await driver.close()
    assert silent.value.reason == "timeout"
    assert cut.value.reason in ("connection lost", "BadConnectionClosed", "closed")


@pytest.mark.parametrize(
    ("fault", "exc", "reason"),
    [
        (Garbage(lambda r: [], "no result"), DriverUnavailable, "protocol error"),
        (Garbage(lambda r: r + r, "two results"), DriverUnavailable, "protocol error"),
        (
            Garbage(lambda r: [status(StatusCodes.BadTypeMismatch)], "bad status"),
            DriverError,
            "BadTypeMismatch",
        ),
        (
            Garbage(lambda r: [status(StatusCodes.BadOutOfRange | 0x0400)], "info bits"),
            DriverError,
            "BadOutOfRange",
        ),
        (
            Raise(TOO_MANY),
            DriverUnavailable,
            "BadTooManyOperations",
        ),
        (Raise(RuntimeError("boom")), DriverUnavailable, "RuntimeError"),
    ],
    ids=["no-result", "two-results", "bad-status", "info-bits", "service-fault", "unexpected"],
)
async def test_a_write_answer_that_is_not_one_good_status(
    served: tuple[OpcUaSimulator, OpcUaDriver], fault: Any, exc: type[Exception], reason: str
) -> None:
    _, driver = served
    client = driver._client
    assert client is not None
    plan = FaultPlan().at("write", 1, fault)
    client.uaclient = Faulty(client.uaclient, plan)  # type: ignore[assignment]
    with pytest.raises(exc) as caught:
        await driver.write("Int16", 5)
    assert plan.fired
    assert cast(DriverError, caught.value).reason == reason


async def test_a_hanging_write_is_cut_by_the_callers_timeout(
    served: tuple[OpcUaSimulator, OpcUaDriver],
) -> None:
    _, driver = served
    client = driver._client
    assert client is not None
    plan = FaultPlan().at("write", 1, Hang())
    client.uaclient = Faulty(client.uaclient, plan)  # type: ignore[assignment]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await driver.write("Int16", 5)
    assert plan.fired


# ------------------------------------------------------------------ a third-party peer


async def test_asyncua_client_reads_what_our_driver_wrote_into_a_plain_asyncua_server(
    tmp_path: Path,
) -> None:
    """A server built with asyncua alone (no simulator code): built-in types, a subtype
    (Duration is a Double), an enumeration (an Int32), an abstract Number holding an
    Int16, and an array node the config does not call an array. asyncua's own client
    reads the values back with their Variant types."""
    server = Server()
    await server.init()
    server.set_endpoint("opc.tcp://127.0.0.1:0/peer")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:peer")
    objects = server.nodes.objects
    created: dict[str, Any] = {}
    for t, (start, _) in CASES.items():
        vt = getattr(ua.VariantType, t)
        created[t] = await objects.add_variable(
            sid(f"P.{t}", ns), ua.QualifiedName(t, ns), ua.Variant(start, vt)
        )
    created["duration"] = await objects.add_variable(
        sid("P.Duration", ns),
        ua.QualifiedName("Duration", ns),
        ua.Variant(1.0, ua.VariantType.Double),
        datatype=ua.NodeId.from_string(f"i={ObjectIds.Duration}"),
    )
    created["state"] = await objects.add_variable(
        sid("P.State", ns),
        ua.QualifiedName("State", ns),
        ua.Variant(0, ua.VariantType.Int32),
        datatype=ua.NodeId.from_string(f"i={ObjectIds.ServerState}"),
    )
    created["number"] = await objects.add_variable(
        sid("P.Number", ns),
        ua.QualifiedName("Number", ns),
        ua.Variant(3, ua.VariantType.Int16),
        datatype=ua.NodeId.from_string(f"i={ObjectIds.Number}"),
    )
    created["array"] = await objects.add_variable(
        sid("P.Array", ns),
        ua.QualifiedName("Array", ns),
        ua.Variant([1, 2], ua.VariantType.Int16),
    )
    await created["array"].write_value_rank(1)
    for node in created.values():
        await node.set_writable()
    await server.start()
    try:
        port = server.bserver._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        endpoint = f"opc.tcp://127.0.0.1:{port}/peer"
        names = [*CASES, "duration", "state", "number", "array"]
        dev = device(
            tmp_path,
            [{"name": n, "node_id": f"ns={ns};s=P.{n.title() if n.islower() else n}"}
             for n in names],
        )  # fmt: skip
        driver = OpcUaDriver(at(dev, endpoint))
        await driver.connect()
        try:
            for t, (_, written) in CASES.items():
                await driver.write(t, written)
            await driver.write("duration", 2.5)
            await driver.write("state", 4)
            await driver.write("number", -7)
            with pytest.raises(WriteRefused) as array:
                await driver.write("array", 1)
            with pytest.raises(WriteRefused):
                await driver.write("number", 1.5)  # the Number node holds an Int16
        finally:
            await driver.close()
        assert array.value.reason == "not writable"
        assert "ValueRank 1" in array.value.detail
        async with Client(endpoint) as client:
            for t, (_, written) in CASES.items():
                dv = await client.get_node(created[t].nodeid).read_data_value()
                assert dv.Value is not None
                assert dv.Value.Value == written, t
                assert dv.Value.VariantType == getattr(ua.VariantType, t), t
            expected = {
                "duration": (2.5, ua.VariantType.Double),
                "state": (4, ua.VariantType.Int32),
                "number": (-7, ua.VariantType.Int16),
                "array": ([1, 2], ua.VariantType.Int16),
            }
            for name, (value, vtype) in expected.items():
                dv = await client.get_node(created[name].nodeid).read_data_value()
                assert dv.Value is not None
                assert (dv.Value.Value, dv.Value.VariantType) == (value, vtype), name
    finally:
        await server.stop()
