"""The OPC UA driver against the real asyncua simulator on 127.0.0.1 (ports from the OS)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverConfigError, DriverUnavailable, RawReading
from drivers.opcua import certs
from drivers.opcua.browse import browse, to_yaml
from drivers.opcua.config import OpcUaDevice, OpcUaTag
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.simulator import OpcUaSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCALARS = [
    "Boolean", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64",
    "Float", "Double", "String", "DateTime", "ByteString", "Guid", "LocalizedText",
]  # fmt: skip
PY_TYPE: dict[str, type] = {
    "Boolean": bool,
    "Float": float,
    "Double": float,
    "String": str,
    "DateTime": str,
    "ByteString": str,
    "Guid": str,
    "LocalizedText": str,
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


def at(dev: OpcUaDevice, endpoint: str, **changes: Any) -> OpcUaDevice:
    """The same device pointed at the simulator's actual endpoint."""
    data = dev.model_dump()
    data.update(endpoint=endpoint, **changes)
    if dev.password is not None and "password" not in changes:
        data["password"] = dev.password.get_secret_value()
    return OpcUaDevice.model_validate(data)


class Collector:
    """A sink remembering every batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[RawReading]] = []
        self.changed = asyncio.Event()

    async def __call__(self, batch: Sequence[RawReading]) -> None:
        self.batches.append(list(batch))
        self.changed.set()

    async def wait_for(self, pred: Any) -> RawReading:
        while True:
            for batch in self.batches:
                for r in batch:
                    if pred(r):
                        return r
            self.changed.clear()
            await self.changed.wait()


@pytest.fixture
async def driver_factory() -> AsyncIterator[Any]:
    made: list[OpcUaDriver] = []

    def make(dev: OpcUaDevice) -> OpcUaDriver:
        d = OpcUaDriver(dev)
        made.append(d)
        return d

    yield make
    for d in made:
        await d.close()


async def test_reads_every_scalar_type_array_and_structure(
    tmp_path: Path, driver_factory: Any
) -> None:
    tags: list[dict[str, Any]] = [
        {"name": t, "node_id": f"ns=2;s=Oven.{t}", "type": t} for t in SCALARS
    ]
    tags.append({"name": "zones", "node_id": "ns=2;i=5001", "type": "Float", "array_length": 4})
    tags.append(
        {
            "name": "recipe",
            "browse_path": "0:Objects/{urn:acme:oven}Oven/{urn:acme:oven}Recipe",
            "type": "Structure",
            "fields": {"setpoint": "Double", "name": "String", "steps": "Int32"},
        }
    )
    dev = device(tmp_path, tags)
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        drv = driver_factory(at(dev, sim.endpoints["oven"]))
        await drv.connect()
        readings = await drv.read("default")
    assert [r.tag for r in readings] == [t["name"] for t in tags]
    by_tag = {r.tag: r for r in readings}
    for r in readings:
        assert r.quality == "good", r
        assert r.ts_source is not None
    for t in SCALARS:
        assert type(by_tag[t].value) is PY_TYPE.get(t, int), (t, by_tag[t].value)
    zones = by_tag["zones"].value
    assert isinstance(zones, list)
    assert len(zones) == 4
    assert all(isinstance(z, float) for z in zones)
    recipe = by_tag["recipe"].value
    assert isinstance(recipe, dict)
    assert set(recipe) == {"setpoint", "name", "steps"}
    assert recipe["name"] == "SIM"
    assert drv.loaded_type_definitions


async def test_unknown_node_is_bad_with_status_name_and_code(
    tmp_path: Path, driver_factory: Any
) -> None:
    served = device(tmp_path, [{"name": "t", "node_id": "ns=2;s=T"}])
    async with OpcUaSimulator([served], cert_dir=tmp_path / "sim") as sim:
        dev = device(
            tmp_path,
            [
                {"name": "t", "node_id": "ns=2;s=T"},
                {"name": "gone", "node_id": "ns=2;s=Gone"},
                {"name": "nopath", "browse_path": "0:Objects/2:Nothing"},
            ],
        )
        drv = driver_factory(at(dev, sim.endpoints["oven"]))
        await drv.connect()
        t, gone, nopath = await drv.read("default")
    assert t.quality == "good"
    assert (gone.quality, gone.reason, gone.code, gone.value) == (
        "bad",
        "BadNodeIdUnknown",
        0x80340000,
        None,
    )
    assert nopath.quality == "bad"
    assert nopath.reason == "BadNoMatch"
    assert nopath.value is None


async def test_read_is_split_to_max_nodes_per_read(tmp_path: Path, driver_factory: Any) -> None:
    dev = device(tmp_path, [{"name": f"t{i}", "node_id": f"ns=2;i={100 + i}"} for i in range(12)])
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim", max_nodes_per_read=5) as sim:
        drv = driver_factory(at(dev, sim.endpoints["oven"]))
        await drv.connect()
        assert drv.max_nodes_per_read == 5
        before = len(sim.read_calls("oven"))
        readings = await drv.read("default")
        sizes = sim.read_calls("oven")[before:]
    assert sizes == [5, 5, 2]
    assert [r.quality for r in readings] == ["good"] * 12


async def test_subscribe_delivers_and_respects_deadband(
    tmp_path: Path, driver_factory: Any
) -> None:
    constant = {"generator": "constant", "value": 10.0}
    dev = device(
        tmp_path,
        [
            {"name": "temp", "node_id": "ns=2;s=Temp", "group": "fast", "simulate": constant},
            {"name": "ramp", "node_id": "ns=2;s=Ramp", "group": "fast"},
        ],
        poll_groups={
            "fast": {
                "interval_s": 0.05,
                "mode": "subscribe",
                "subscription": {"deadband": {"type": "absolute", "value": 1.0}},
            }
        },
    )
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        drv = driver_factory(at(dev, sim.endpoints["oven"]))
        await drv.connect()
        sink = Collector()
        await drv.subscribe("fast", sink)
        await sink.wait_for(lambda r: r.tag == "temp" and r.value == 10.0)
        await sim.set_value("oven", "temp", 10.5)  # inside the band: not reported
        await sim.set_value("oven", "temp", 12.0)  # outside: reported
        await sink.wait_for(lambda r: r.tag == "temp" and r.value == 12.0)
        assert sim.subscription_count("oven") == 1
    temps = [r.value for b in sink.batches for r in b if r.tag == "temp"]
    assert temps == [10.0, 12.0]
    # Notifications arrive in batches (one sink call per Publish), not one per value.
    assert any(len(b) > 1 for b in sink.batches)


async def test_untrusted_server_certificate_is_refused_then_trusted(
    tmp_path: Path, driver_factory: Any
) -> None:
    dev = device(
        tmp_path,
        [{"name": "t", "node_id": "ns=2;s=T"}],
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
    )
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        endpoint = sim.endpoints["oven"]
        server_der = sim.certificate("oven")
        assert server_der is not None
        drv = driver_factory(at(dev, endpoint))
        with pytest.raises(DriverConfigError) as err:
            await drv.connect()
        assert err.value.reason == "untrusted server certificate"
        assert certs.sha1_thumbprint(server_der) in err.value.detail
        assert f"edge-agent opcua trust {endpoint}" in err.value.detail
        assert sim.session_count("oven") == 0

        pinned = driver_factory(
            at(dev, endpoint, server_certificate_thumbprint=certs.sha256_thumbprint(server_der))
        )
        await pinned.connect()
        assert (await pinned.read("default"))[0].quality == "good"
        await pinned.close()

        certs.trust_certificate(server_der, tmp_path / "client" / "trusted")
        await drv.connect()
        assert (await drv.read("default"))[0].quality == "good"
    # The client certificate was generated once and kept.
    own = tmp_path / "client" / "own" / "cert.der"
    assert certs.application_uri_of(own.read_bytes()) == dev.application_uri


async def test_policy_not_offered_is_refused_without_fallback(
    tmp_path: Path, driver_factory: Any
) -> None:
    served = device(tmp_path, [{"name": "t", "node_id": "ns=2;s=T"}])  # no security
    async with OpcUaSimulator([served], cert_dir=tmp_path / "sim") as sim:
        dev = at(served, sim.endpoints["oven"], security_policy="Aes256_Sha256_RsaPss")
        drv = driver_factory(dev)
        with pytest.raises(DriverConfigError) as err:
            await drv.connect()
    assert err.value.reason == "security policy not offered"
    assert "None/None_" in err.value.detail or "None" in err.value.detail


async def test_username_login(tmp_path: Path, driver_factory: Any) -> None:
    dev = device(
        tmp_path,
        [{"name": "t", "node_id": "ns=2;s=T"}],
        security_policy="Aes128_Sha256_RsaOaep",
        username="operator",
        password="right",
    )
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        endpoint = sim.endpoints["oven"]
        der = sim.certificate("oven")
        assert der is not None
        certs.trust_certificate(der, tmp_path / "client" / "trusted")
        good = driver_factory(at(dev, endpoint))
        await good.connect()
        assert (await good.read("default"))[0].quality == "good"
        await good.close()

        bad = driver_factory(at(dev, endpoint, password="wrong"))
        with pytest.raises(DriverConfigError) as err:
            await bad.connect()
        assert err.value.reason == "BadUserAccessDenied"
        assert "user name or password" in str(err.value)
        assert "wrong" not in str(err.value)


async def test_password_is_never_sent_in_clear(tmp_path: Path, driver_factory: Any) -> None:
    dev = device(
        tmp_path, [{"name": "t", "node_id": "ns=2;s=T"}], username="operator", password="pw"
    )
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        der = sim.certificate("oven")
        assert der is not None
        certs.trust_certificate(der, tmp_path / "client" / "trusted")
        drv = driver_factory(at(dev, sim.endpoints["oven"]))
        with pytest.raises(DriverConfigError) as err:
            await drv.connect()
        assert err.value.reason == "password would be sent in clear text"
        assert sim.session_count("oven") == 0


async def test_close_leaves_no_session_or_subscription(tmp_path: Path, driver_factory: Any) -> None:
    dev = device(tmp_path, [{"name": "t", "node_id": "ns=2;s=T"}], mode="subscribe")
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        drv = driver_factory(at(dev, sim.endpoints["oven"]))
        for _ in range(3):
            await drv.connect()
            sink = Collector()
            await drv.subscribe("default", sink)
            await sink.wait_for(lambda r: r.tag == "t")
            assert sim.session_count("oven") == 1
            assert sim.subscription_count("oven") == 1
            await drv.close()
        assert sim.session_count("oven") == 0
        assert sim.subscription_count("oven") == 0
        with pytest.raises(DriverUnavailable):
            await drv.read("default")


# ------------------------------------------------------- server in another process


async def start_sim_process(config: Path, cert_dir: Path) -> tuple[Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "drivers.opcua.simulator",
        str(config),
        "--cert-dir",
        str(cert_dir),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        await stop_process(proc)
        raise RuntimeError("simulator did not start")
    return proc, str(json.loads(line)["endpoint"])


async def stop_process(proc: Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.communicate()


def write_config(path: Path, endpoint: str) -> None:
    path.write_text(
        "agent: {id: test}\n"
        "devices:\n"
        "  - name: oven\n"
        "    protocol: opcua\n"
        f"    endpoint: {endpoint}\n"
        "    tags:\n"
        "      - {name: temp, node_id: 'ns=2;s=Temp'}\n",
        encoding="utf-8",
    )


async def sim_counts(endpoint: str, tmp_path: Path) -> dict[str, Any]:
    probe = OpcUaDriver(
        device(
            tmp_path,
            [
                {"name": k, "node_id": f"nsu=urn:edge-agent:simulator;s=Sim.{k}"}
                for k in ("Sessions", "Subscriptions")
            ],
            endpoint=endpoint,
        )
    )
    await probe.connect()
    try:
        while True:  # the simulator refreshes its counters every 0.1 s
            values = {r.tag: r.value for r in await probe.read("default")}
            if values["Sessions"] == 2:  # the driver's session and ours
                return values
            await asyncio.sleep(0.05)
    finally:
        await probe.close()


async def test_server_killed_and_restarted(tmp_path: Path, driver_factory: Any) -> None:
    config = tmp_path / "sim.yaml"
    write_config(config, "opc.tcp://127.0.0.1:0/sim")
    proc, endpoint = await start_sim_process(config, tmp_path / "sim")
    try:
        dev = device(tmp_path, [{"name": "temp", "node_id": "ns=2;s=Temp"}], endpoint=endpoint)
        dev = at(dev, endpoint, mode="subscribe")
        drv = driver_factory(dev)
        await drv.connect()
        sink = Collector()
        await drv.subscribe("default", sink)
        await sink.wait_for(lambda r: r.tag == "temp")

        proc.send_signal(signal.SIGKILL)
        await stop_process(proc)
        with pytest.raises(DriverUnavailable):
            await drv.wait_closed()
        with pytest.raises(DriverUnavailable):
            await drv.read("default")
        await drv.close()
        with pytest.raises(DriverUnavailable):
            await drv.connect()  # nothing listens any more
        await drv.close()

        write_config(config, endpoint)  # the same port again
        proc, endpoint2 = await start_sim_process(config, tmp_path / "sim")
        assert endpoint2 == endpoint
        await drv.connect()
        sink2 = Collector()
        await drv.subscribe("default", sink2)
        await sink2.wait_for(lambda r: r.tag == "temp" and r.quality == "good")
        counts = await sim_counts(endpoint, tmp_path)
        assert counts["Subscriptions"] == 1
    finally:
        await stop_process(proc)


# ------------------------------------------------------------------------ browse


async def test_browse_output_round_trips_into_tag_configs(tmp_path: Path) -> None:
    dev = device(
        tmp_path,
        [
            {"name": "temp", "browse_path": "0:Objects/2:Oven/2:Temperature"},
            {"name": "count", "browse_path": "0:Objects/2:Oven/2:Count", "type": "UInt32"},
            {"name": "zones", "node_id": "ns=2;s=Zones", "type": "Int16", "array_length": 3},
        ],
    )
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        endpoint = sim.endpoints["oven"]
        found = await browse(endpoint, root="i=85", depth=4)
        text = to_yaml(found)
    by_path = {v.browse_path: v for v in found}
    assert by_path["0:Objects/2:Oven/2:Temperature"].data_type == "Double"
    assert by_path["0:Objects/2:Oven/2:Count"].data_type == "UInt32"
    import yaml

    data = yaml.safe_load(text)
    tags = [OpcUaTag.model_validate(t) for t in data["tags"]]
    names = {t.node_id for t in tags}
    assert {"ns=2;s=Oven.Temperature", "ns=2;s=Oven.Count", "ns=2;s=Zones"} <= names
    assert len({t.name for t in tags}) == len(tags)


async def test_large_device_is_served_in_folders_and_every_node_reads(tmp_path: Path) -> None:
    # asyncua's address space checks each new node against all its siblings, so the
    # simulator splits a large device into folders; clients see every node id unchanged.
    n = 350
    dev = device(
        tmp_path, [{"name": f"v{i:03d}", "node_id": f"ns=2;s=Big.V{i:03d}"} for i in range(n)]
    )
    from asyncua.client.client import Client

    from drivers.opcua.simulator import FOLDER_CHILDREN

    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as sim:
        found = await browse(sim.endpoints["oven"], root="i=85", depth=5)
        async with Client(sim.endpoints["oven"]) as client:
            values = await client.read_values(
                [client.get_node(f"ns=2;s=Big.V{i:03d}") for i in range(n)]
            )
    ids = {v.node_id for v in found if v.node_id.startswith("ns=2;s=Big.")}
    assert ids == {f"ns=2;s=Big.V{i:03d}" for i in range(n)}
    folders: dict[str, int] = {}
    for v in found:
        if v.node_id.startswith("ns=2;s=Big."):
            parent = v.browse_path.rsplit("/", 1)[0]
            folders[parent] = folders.get(parent, 0) + 1
    assert len(folders) == -(-n // FOLDER_CHILDREN)
    assert max(folders.values()) <= FOLDER_CHILDREN
    assert all(isinstance(x, float) for x in values)
