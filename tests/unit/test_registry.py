"""The protocol registry: a protocol registered from a test joins the config, the schema,
the reference, the CLI and the runtime's driver factory, without any file under agent/."""

from __future__ import annotations

import ast
import asyncio
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field
from structlog.testing import capture_logs

from agent import cli
from agent.config import Config, ConfigError, config_model, load_config, parse_config
from agent.poller import DevicePoller
from agent.runtime import make_driver
from agent.schemas import reference_markdown, schemas
from agent.simulate import SimulatorUnavailable, simulators
from drivers import registry
from drivers.base import DeviceCommon, DriverContext, DriverUnavailable, RawReading, TagCommon
from drivers.fake import FakeBench, FakeDevice, FakeDriver, FakeLink
from drivers.modbus.config import ModbusDevice
from drivers.registry import Protocol, UnknownProtocol

# The built-in protocols, by name (each module's last part is its protocol's name).
BUILTIN = [module.rsplit(".", 1)[-1] for module in registry.BUILTIN]

ROOT = Path(__file__).parents[2]

FAKE_CONFIG = """\
agent: {id: gw}
devices:
  - name: oven
    protocol: fake
    interval_s: 0.01
    backoff_min_s: 0.01
    backoff_max_s: 0.02
    tags:
      - {name: temp, type: float, simulate: {generator: constant, value: 21.5}}
      - {name: count, type: int, simulate: {generator: constant, value: 7}}
  - name: press
    protocol: modbus
    host: 127.0.0.1
    tags:
      - {name: p, address: 0}
"""

FAKE_ONLY = FAKE_CONFIG.split("  - name: press")[0]


@pytest.fixture
def bench() -> Iterator[FakeBench]:
    """The fake protocol, registered for this test only."""
    bench = FakeBench()
    with registry.registered(bench.protocol()):
        yield bench
    assert "fake" not in registry.protocols()


def run_cli(argv: list[str]) -> int:
    """A command in-process, as `edge-agent` runs it, minus its logging set-up (which
    would point structlog at pytest's captured stderr for the tests after this one)."""
    args = cli.build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def write(tmp_path: Path, text: str, name: str = "plant.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the registry


def test_builtin_protocols_are_registered_in_order() -> None:
    assert list(registry.protocols())[:2] == ["modbus", "opcua"]
    assert registry.get("modbus").device_model is ModbusDevice
    assert "simulate" in registry.get("opcua").capabilities
    assert registry.get("opcua").add_commands is not None


def test_unknown_protocol_says_which_are_registered() -> None:
    with pytest.raises(
        UnknownProtocol, match=r"unknown protocol 'nope'; registered: modbus, opcua"
    ):
        registry.get("nope")


def _factory(device: Any, context: DriverContext) -> Any:
    raise AssertionError("not called")


def test_entry_is_checked_when_made() -> None:
    with pytest.raises(
        ValueError, match=r"FakeDevice.protocol allows \['fake'\], must be \['other'\]"
    ):
        Protocol(name="other", device_model=FakeDevice, create_driver=_factory)
    with pytest.raises(ValueError, match="needs a field protocol: Literal"):
        Protocol(name="common", device_model=DeviceCommon, create_driver=_factory)
    with pytest.raises(ValueError, match=r"unknown capabilities \['teleport'\]"):
        Protocol(
            name="fake",
            device_model=FakeDevice,
            create_driver=_factory,
            capabilities=frozenset({"teleport"}),
        )
    with pytest.raises(ValueError, match="lower-case identifier"):
        Protocol(name="Fake-1", device_model=FakeDevice, create_driver=_factory)


def test_second_protocol_of_a_name_is_refused(bench: FakeBench) -> None:
    with pytest.raises(ValueError, match="protocol 'fake' is already registered"):
        registry.register(FakeBench().protocol())
    replacement = FakeBench().protocol()
    registry.register(replacement, replace=True)
    assert registry.get("fake") is replacement


def test_registered_restores_a_replaced_builtin() -> None:
    original = registry.get("modbus")
    stand_in = Protocol(name="modbus", device_model=ModbusDevice, create_driver=_factory)
    with registry.registered(stand_in):
        assert registry.get("modbus") is stand_in
    assert registry.get("modbus") is original


def test_generation_changes_with_the_set_of_protocols() -> None:
    before = registry.generation()
    with registry.registered(FakeBench().protocol()):
        during = registry.generation()
    assert before != during != registry.generation()


class _EntryPoint:
    def __init__(self, name: str, value: object) -> None:
        self.name = name
        self.value = f"tests:{name}"
        self._value = value

    def load(self) -> object:
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


def test_entry_points_load_and_a_broken_plugin_is_logged_and_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = FakeBench()
    points = [
        _EntryPoint("broken", ImportError("No module named 'vendor_lib'")),
        _EntryPoint("wrong", object()),
        _EntryPoint("fake", bench.protocol()),
    ]
    monkeypatch.setattr(registry, "_entries", {})
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: points)
    with capture_logs() as logs:
        names = list(registry.protocols())
    assert names == [m.rsplit(".", 1)[1] for m in registry.BUILTIN] + ["fake"]
    failed = [e for e in logs if e["event"] == "registry.plugin.failed"]
    assert [e["entry_point"] for e in failed] == ["broken", "wrong"]
    assert failed[0]["error"] == "ImportError: No module named 'vendor_lib'"
    assert "not a drivers.registry.Protocol" in failed[1]["error"]


def test_agent_imports_no_protocol_by_name() -> None:
    """agent/ asks drivers.registry; only the shared driver modules (contract, registry,
    generators, the links every serial protocol shares) may be imported."""
    allowed = {"drivers", "drivers.base", "drivers.registry", "drivers.generators", "drivers.links"}
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.startswith("drivers") and name not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == []


# ---------------------------------------------------------------- config, schema, docs


def test_config_union_follows_the_registry(bench: FakeBench) -> None:
    config = parse_config(FAKE_CONFIG, "plant.yaml")
    oven, press = config.devices
    assert isinstance(oven, FakeDevice)
    assert isinstance(press, ModbusDevice)
    assert oven.tags[0].simulate is not None
    assert isinstance(config, Config)
    assert Config.model_validate(config.model_dump()).devices[0] == oven


def test_a_protocol_registered_after_import_is_accepted_then_forgotten() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(FAKE_CONFIG, "plant.yaml")
    assert info.value.problems == [
        "plant.yaml:4 devices[0].protocol: unknown protocol 'fake'; allowed: "
        + ", ".join(m.rsplit(".", 1)[1] for m in registry.BUILTIN)
    ]
    with registry.registered(FakeBench().protocol()):
        assert parse_config(FAKE_CONFIG).devices[0].name == "oven"
    with pytest.raises(ConfigError):
        parse_config(FAKE_CONFIG)


def test_fake_device_errors_point_at_file_and_line(bench: FakeBench) -> None:
    text = (
        FAKE_CONFIG.replace("type: float,", "type: flaot,")
        .replace("    interval_s: 0.01\n", "    intervl_s: 0.01\n", 1)
        .replace("protocol: fake\n", "protocol: fake\n    endpoint: tcp://x\n", 1)
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "plant.yaml")
    assert info.value.problems[0] == (
        "plant.yaml:5 devices[0].endpoint: String should match pattern '^fake://[A-Za-z0-9_.\\-]+$'"
    )
    assert info.value.problems[1].startswith(
        "plant.yaml:6 devices[0].intervl_s: unknown key 'intervl_s'; did you mean 'interval_s'?"
        " (allowed: backoff_max_s, backoff_min_s, cycles, down_report_interval_s, enabled,"
    )
    assert info.value.problems[2] == (
        "plant.yaml:10 devices[0].tags[0].type: Input should be 'bool', 'int', 'float' or 'str'"
    )
    assert len(info.value.problems) == 3


def test_config_model_is_cached_per_generation(bench: FakeBench) -> None:
    assert config_model() is config_model()
    first = config_model()
    with registry.registered(
        Protocol(name="modbus", device_model=ModbusDevice, create_driver=_factory)
    ):
        assert config_model() is not first


def test_schema_and_reference_contain_the_registered_protocol(bench: FakeBench) -> None:
    schema = schemas()["config.schema.json"]
    assert "FakeDevice" in schema["$defs"]
    mapping = schema["properties"]["devices"]["items"]["discriminator"]
    assert set(mapping["mapping"]) == {m.rsplit(".", 1)[1] for m in registry.BUILTIN} | {"fake"}
    text = reference_markdown()
    assert "## `devices[] (protocol: fake)`" in text
    assert "## `devices[].tags[] (fake)`" in text
    assert "| `endpoint` | str | `'fake://local'` |" in text


def test_schema_without_the_fake_protocol_does_not_name_it() -> None:
    assert "FakeDevice" not in str(schemas()["config.schema.json"])
    assert "(protocol: fake)" not in reference_markdown()


# ---------------------------------------------------------------- CLI


def test_plan_prints_each_protocols_plan(
    bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, FAKE_CONFIG)
    assert run_cli(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "device oven (fake fake://local, 2 tags)\n  group default every 0.01 s: 2 tags, 1 request"
        in out
    )
    assert "device press (modbus 127.0.0.1:502 unit 1, 1 tags)" in out


def test_plan_of_a_protocol_without_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = FakeBench().protocol()
    bare = Protocol(name="fake", device_model=FakeDevice, create_driver=entry.create_driver)
    with registry.registered(bare):
        assert run_cli(["plan", str(write(tmp_path, FAKE_CONFIG))]) == 0
    assert "oven: fake (no request plan)" in capsys.readouterr().out


def test_plan_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(devices: Sequence[Any]) -> str:
        raise ValueError("tag temp: cannot be planned")

    entry = FakeBench().protocol()
    with registry.registered(
        Protocol(
            name="fake", device_model=FakeDevice, create_driver=entry.create_driver, plan=refuse
        )
    ):
        assert run_cli(["plan", str(write(tmp_path, FAKE_CONFIG))]) == 2
    assert "fake: tag temp: cannot be planned" in capsys.readouterr().err


def test_validate_reports_fake_device_problems(
    bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, FAKE_CONFIG.replace("type: int,", "type: integer,"))
    assert run_cli(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: 1 problem found:" in err
    assert f"{path}:10 devices[0].tags[1].type: Input should be 'bool', 'int'" in err
    assert run_cli(["validate", str(write(tmp_path, FAKE_CONFIG))]) == 0


def test_protocols_command_and_protocol_subcommands(
    bench: FakeBench, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []

    def add_commands(sub: Any) -> None:
        p = sub.add_parser("fake", help="fake tools")
        p.add_argument("what")

        def run(args: Any) -> int:
            calls.append(args.what)
            return 0

        p.set_defaults(func=run)

    entry = Protocol(
        name="fake",
        device_model=FakeDevice,
        create_driver=bench.create_driver,
        add_commands=add_commands,
        summary="fakes",
    )
    with registry.registered(entry):
        assert run_cli(["protocols"]) == 0
        assert run_cli(["fake", "ping"]) == 0
    out = capsys.readouterr().out
    assert "modbus\tcolumns,shared_links,simulate,write\t" in out
    assert "fake\t-\tfakes\n" in out
    assert calls == ["ping"]


# ---------------------------------------------------------------- drivers


def test_make_driver_uses_the_registry(bench: FakeBench) -> None:
    config = parse_config(FAKE_CONFIG)
    context = DriverContext()
    driver = make_driver(config.devices[0], context)
    assert isinstance(driver, FakeDriver)
    assert driver.context is context
    assert bench.drivers == [driver]


def test_make_driver_refuses_a_device_of_another_model(bench: FakeBench) -> None:
    class Impostor(DeviceCommon):
        protocol: Literal["fake"] = "fake"

    with pytest.raises(TypeError, match="a Impostor is not a FakeDevice"):
        make_driver(Impostor(name="x"))


async def test_driver_context_shares_and_closes_everything_once() -> None:
    context = DriverContext()
    order: list[str] = []

    class Sync:
        def close(self) -> None:
            order.append("sync")

    class Async:
        async def aclose(self) -> None:
            order.append("async")

    class Broken:
        async def aclose(self) -> None:
            order.append("broken")
            raise OSError("port vanished")

    made = context.shared("a", Sync)
    assert context.shared("a", lambda: pytest.fail("made twice")) is made
    context.shared("b", Broken)
    context.shared("c", Async)
    context.shared("d", object)  # nothing to close
    assert len(context) == 4
    with capture_logs() as logs:
        await context.aclose()
    assert order == ["async", "broken", "sync"]  # newest first, past the broken one
    assert context.close_errors == [("b", "OSError: port vanished")]
    assert logs[0]["event"] == "driver.context.close_failed"
    assert context.closed
    assert len(context) == 0
    with pytest.raises(RuntimeError, match="driver context is closed; cannot make 'e'"):
        context.shared("e", object)
    await context.aclose()  # again: nothing happens


def fake_device(name: str = "oven", endpoint: str = "fake://local", **kw: Any) -> FakeDevice:
    return FakeDevice.model_validate(
        {
            "name": name,
            "protocol": "fake",
            "endpoint": endpoint,
            "tags": [
                {"name": "temp", "simulate": {"generator": "constant", "value": 21.5}},
                {"name": "on", "type": "bool", "group": "slow"},
            ],
            "poll_groups": {"slow": {"interval_s": 5}},
            **kw,
        }
    )


async def test_fake_driver_unscripted_is_unreachable_without_a_server() -> None:
    bench = FakeBench()
    driver = bench.create_driver(fake_device(), DriverContext())
    with pytest.raises(DriverUnavailable, match="unreachable: no fake server at fake://local"):
        await driver.connect()
    with pytest.raises(DriverUnavailable, match="not_connected"):
        await driver.read("default")
    assert [c.outcome for c in bench.calls] == [
        "DriverUnavailable: unreachable: no fake server at fake://local",
        "DriverUnavailable: not_connected: read before connect",
    ]


async def test_fake_driver_serves_the_simulator_and_follows_its_script() -> None:
    bench = FakeBench()
    context = DriverContext()
    device = fake_device()
    async with bench.simulate([device]) as served:
        device = served["oven"]
        assert device.endpoint == "fake://sim1"
        driver = bench.create_driver(device, context)
        bench.script("oven").connect(error=DriverUnavailable("refused", "by script"))
        bench.script("oven").read({"temp": 99.0}).read(
            {"temp": RawReading("temp", None, "bad", reason="sensor_broken")}
        )
        bench.script("oven").read(error=DriverUnavailable("timeout"), times=2)
        with pytest.raises(DriverUnavailable, match="refused: by script"):
            await driver.connect()
        await driver.connect()
        assert await driver.read("default") == [RawReading("temp", 99.0)]
        assert await driver.read("default") == [
            RawReading("temp", None, "bad", reason="sensor_broken")
        ]
        for _ in range(2):
            with pytest.raises(DriverUnavailable, match="timeout"):
                await driver.read("default")
        assert await driver.read("default") == [RawReading("temp", 21.5)]
        slow = await driver.read("slow")
        assert [r.tag for r in slow] == ["on"]
        assert isinstance(slow[0].value, bool)
        assert bench.script("oven").pending == 0
        assert bench.simulators[0].server("oven").reads == 4
        await driver.close()
    assert [c.op for c in bench.calls_of("oven")] == ["connect", "connect"] + ["read"] * 6 + [
        "close"
    ]


async def test_fake_driver_hang_lasts_until_cancelled() -> None:
    bench = FakeBench()
    device = fake_device()
    async with bench.simulate([device]) as served:
        driver = bench.create_driver(served["oven"], DriverContext())
        await driver.connect()
        bench.script("oven").read(hang_s=math.inf)
        task = asyncio.create_task(driver.read("default"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_devices_on_one_endpoint_share_one_link_until_the_context_closes() -> None:
    bench = FakeBench()
    context = DriverContext()
    a, b = fake_device("a", "fake://line1"), fake_device("b", "fake://line1")
    other = fake_device("c", "fake://line2")
    async with bench.simulate([a, b, other]) as served:
        drivers = [bench.create_driver(served[n], context) for n in ("a", "b", "c")]
        for d in drivers:
            await d.connect()
        assert drivers[0].link is drivers[1].link
        assert drivers[0].link is not drivers[2].link
        assert drivers[0].link is not None
        assert drivers[0].link.users == {"a", "b"}
        await drivers[0].read("default")
        await drivers[1].read("default")
        link = drivers[0].link
        assert isinstance(link, FakeLink)
        assert link.requests == 2
        await context.aclose()
        assert link.closed
        with pytest.raises(DriverUnavailable, match="link_closed"):
            await drivers[1].read("default")


async def test_the_poller_runs_a_fake_driver_through_outage_and_recovery() -> None:
    bench = FakeBench()
    device = fake_device(interval_s=0.01, backoff_min_s=0.01, backoff_max_s=0.02)
    batches: list[list[RawReading]] = []

    async def sink(readings: Sequence[RawReading]) -> None:
        batches.append(list(readings))

    async with bench.simulate([device]) as served:
        device = served["oven"]
        bench.script("oven").read(error=DriverUnavailable("timeout", "no answer"))
        poller = DevicePoller(
            device,
            "fake",
            bench.create_driver(device, DriverContext()),
            {"default": ["temp"]},
            sink,
        )
        task = asyncio.create_task(poller.run())
        try:
            async with asyncio.timeout(10):
                while len([b for b in batches if b[0].quality == "good"]) < 3:
                    await asyncio.sleep(0.005)
        finally:
            task.cancel()
            await asyncio.wait({task})
    qualities = [(b[0].quality, b[0].reason) for b in batches]
    assert qualities[0] == ("bad", "timeout")
    assert ("good", None) in qualities
    assert batches[-1] == [RawReading("temp", 21.5)]
    connects = bench.calls_of("oven", "connect")
    assert len(connects) >= 2  # the failed read closed the driver; the poller reconnected
    assert poller.status.state == "up"


# ---------------------------------------------------------------- simulator mode


async def test_simulators_serve_the_fake_devices(bench: FakeBench) -> None:
    config = parse_config(
        FAKE_CONFIG.replace("  - name: press", "  - enabled: false\n    name: press")
    )
    async with simulators(config) as simulated:
        oven, press = simulated.devices
        assert isinstance(oven, FakeDevice)
        assert oven.endpoint == "fake://sim1"
        assert press == config.devices[1]  # disabled: not simulated, left as configured
        assert "fake://sim1" in bench.network.servers
    assert bench.network.servers == {}


@asynccontextmanager
async def _serves_nothing(devices: Sequence[Any]) -> AsyncIterator[Mapping[str, Any]]:
    yield {}


async def test_simulator_mode_refuses_a_protocol_without_simulator(tmp_path: Path) -> None:
    entry = FakeBench().protocol()
    bare = Protocol(name="fake", device_model=FakeDevice, create_driver=entry.create_driver)
    with registry.registered(bare):
        config = load_config(write(tmp_path, FAKE_ONLY))
        with pytest.raises(
            SimulatorUnavailable, match=r"protocol fake has no simulator \(devices oven\)"
        ):
            async with simulators(config):
                pass
    lying = Protocol(
        name="fake",
        device_model=FakeDevice,
        create_driver=entry.create_driver,
        simulate=_serves_nothing,
    )
    with registry.registered(lying):
        config = load_config(write(tmp_path, FAKE_ONLY))
        with pytest.raises(SimulatorUnavailable, match="did not serve device 'oven'"):
            async with simulators(config):
                pass


def test_tag_model_defaults_to_the_item_type_of_tags() -> None:
    from drivers.fake import FakeTag

    assert FakeBench().protocol().tag_model is FakeTag
    assert issubclass(FakeTag, TagCommon)


class BrokenDevice(FakeDevice):
    protocol: Literal["broken"] = Field(description="Always 'broken'.")  # type: ignore[assignment]


@asynccontextmanager
async def _fails_to_start(devices: Sequence[Any]) -> AsyncIterator[Mapping[str, Any]]:
    raise OSError("serial port /dev/ttyUSB9 is gone")
    yield {}  # pragma: no cover


async def test_a_simulator_failing_to_start_stops_those_already_started(
    bench: FakeBench,
) -> None:
    broken = Protocol(
        name="broken",
        device_model=BrokenDevice,
        create_driver=_factory,
        simulate=_fails_to_start,
    )
    text = FAKE_ONLY + "  - {name: other, protocol: broken, tags: [{name: x}]}\n"
    with registry.registered(broken):
        config = parse_config(text)
        with pytest.raises(OSError, match="serial port /dev/ttyUSB9 is gone"):
            async with simulators(config):
                pytest.fail("must not get here")
    assert len(bench.simulators) == 1  # the fake simulator had started ...
    assert bench.network.servers == {}  # ... and was stopped again


def test_loading_the_registry_imports_no_protocol_library() -> None:
    """Registration imports config models only; asyncua (~0.4 s) and pymodbus are
    imported when a driver, simulator or command of theirs is used."""
    code = (
        "import sys\n"
        "from agent.config import parse_config\n"
        "from agent.schemas import schemas\n"
        "from agent.cli import build_parser\n"
        "build_parser(); schemas()\n"
        "parse_config('agent: {id: g}\\ndevices: [{name: d, protocol: modbus, host: h,"
        " tags: [{name: t, address: 0}]}]')\n"
        "print(sorted(m for m in ('asyncua', 'pymodbus') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_served_at_points_each_device_at_its_simulator_and_says_where_it_moved() -> None:
    from structlog.testing import capture_logs

    from drivers.base import served_at

    a = ModbusDevice.model_validate(
        {
            "name": "a",
            "protocol": "modbus",
            "host": "127.0.0.1",
            "port": 5020,
            "tags": [{"name": "t", "address": 0}],
        }
    )
    b = a.model_copy(update={"name": "b", "port": 0})
    with capture_logs() as logs:
        served = served_at([a, b], {"a": ("127.0.0.1", 5020), "b": ("127.0.0.1", 40123)})
    assert served["a"] == a  # served where configured: unchanged, not logged
    assert (served["b"].host, served["b"].port) == ("127.0.0.1", 40123)
    assert [(e["event"], e["device"], e["serving"]) for e in logs] == [
        ("simulator.endpoint", "b", "127.0.0.1:40123")
    ]
