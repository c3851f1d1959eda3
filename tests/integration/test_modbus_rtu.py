"""Modbus RTU on real pty pairs and RTU over TCP, with real framing end to end.

The done-when of shared links: 8 units on one serial line (a pty pair) and 8 behind one
RTU-over-TCP device server, all delivering; the measured bus time per cycle matches
`plan`; a silent unit costs the others at most its timeout, once; noise never yields a
good wrong value. Peers: our LinkSimulator (an RTU slave on the pty's master side, with
the line's timing) and pymodbus' own RTU server (a third party) on a socat pty pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from drivers.base import DriverUnavailable
from drivers.links import Link, RtuOverTcpLink, SerialLink
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import link_plan, plan_device
from drivers.modbus.simulator import LinkSimulator

pytestmark = pytest.mark.integration

LINKS: dict[str, Any] = {
    "line1": SerialLink(type="serial", port="/dev/ttyUSB0", baud=19200, parity="E"),
    "nport": RtuOverTcpLink(type="rtu_over_tcp", host="10.1.2.3", port=4001, baud=9600, parity="N"),
}


def unit(link: str, unit_id: int, timeout_s: float = 0.2, retries: int = 0) -> ModbusDevice:
    """A meter whose values are constants derived from its unit id (exact in float)."""
    return ModbusDevice.model_validate(
        {
            "name": f"{link}-u{unit_id}",
            "protocol": "modbus",
            "link": link,
            "unit_id": unit_id,
            "timeout_s": timeout_s,
            "retries": retries,
            "byte_order": "CDAB",
            "tags": [
                {
                    "name": "power",
                    "address": 0,
                    "type": "float32",
                    "simulate": {"generator": "constant", "value": 10.5 + unit_id},
                },
                {
                    "name": "energy",
                    "address": 2,
                    "type": "uint32",
                    "simulate": {"generator": "constant", "value": 100_000 + unit_id},
                },
                {
                    "name": "temp",
                    "address": 4,
                    "type": "int16",
                    "table": "input",
                    "simulate": {"generator": "constant", "value": -unit_id},
                },
                {
                    "name": "on",
                    "address": unit_id,
                    "type": "bool",
                    "table": "coil",
                    "simulate": {"generator": "constant", "value": True},
                },
            ],
        }
    )


def expected(device: ModbusDevice) -> dict[str, Any]:
    u = device.unit_id
    return {"power": 10.5 + u, "energy": 100_000 + u, "temp": -u, "on": True}


DEVICES = [unit("line1", u) for u in range(1, 9)] + [unit("nport", u) for u in range(1, 9)]


class Bench:
    def __init__(self, sim: LinkSimulator, devices: list[ModbusDevice]) -> None:
        self.sim = sim
        self.links = {name: Link(name, cfg) for name, cfg in sim.links.items()}
        self.drivers = [ModbusDriver(d, link=self.links[d.link or ""]) for d in devices]
        self.durations: dict[str, list[float]] = {}  # per device: seconds of each read

    async def cycle(self, link: str) -> tuple[float, list[Any]]:
        """Poll every unit of `link` once, in turn; (seconds, results)."""
        out: list[Any] = []
        started = time.perf_counter()
        for driver in self.drivers:
            if driver.device.link != link:
                continue
            began = time.perf_counter()
            try:
                out.append((driver.device, await driver.read("default")))
            except DriverUnavailable as exc:
                out.append((driver.device, exc))
            spent = time.perf_counter() - began
            self.durations.setdefault(driver.device.name, []).append(spent)
        return time.perf_counter() - started, out


@pytest.fixture
async def bench_factory() -> AsyncIterator[Any]:
    made: list[tuple[LinkSimulator, Bench]] = []

    async def make(devices: list[ModbusDevice] = DEVICES, **knobs: Any) -> Bench:
        sim = LinkSimulator(LINKS, devices, **knobs)
        await sim.start()
        bench = Bench(sim, devices)
        made.append((sim, bench))
        for driver in bench.drivers:
            await driver.connect()
        return bench

    yield make
    for sim, bench in made:
        for driver in bench.drivers:
            await driver.close()
        await sim.stop()


@pytest.mark.parametrize("link", ["line1", "nport"])
async def test_eight_units_deliver_and_bus_time_matches_plan(bench_factory: Any, link: str) -> None:
    bench = await bench_factory()
    plan = link_plan(link, LINKS[link], DEVICES)  # planned from the config as written
    requests = sum(
        len(g.requests) for d in DEVICES if d.link == link for g in plan_device(d).groups.values()
    )
    await bench.cycle(link)  # warm-up: ports open, first refresh
    stats = bench.links[link].stats
    busy0 = stats.busy_s
    times = []
    for _ in range(3):
        seconds, results = await bench.cycle(link)
        times.append(seconds)
        assert len(results) == 8
        for device, readings in results:
            assert not isinstance(readings, Exception), readings
            assert {r.tag: r.value for r in readings} == expected(device)
            assert {r.quality for r in readings} == {"good"}
    measured = sum(times) / len(times)
    busy = (stats.busy_s - busy0) / len(times)
    print(
        f"\n{link}: plan {plan.cycle_s * 1000:.1f} ms per cycle; measured: link busy "
        f"{busy * 1000:.1f} ms, wall {measured * 1000:.1f} ms ({requests} requests)"
    )
    # The plan counts the wire time and the silences; the measurement adds the units'
    # reaction (0.5 ms each in the simulator) and the event loop's scheduling.
    assert plan.cycle_s <= busy
    for seconds in (busy, measured):
        assert seconds - plan.cycle_s <= 0.15 * plan.cycle_s + 0.003 * requests


async def test_a_silent_unit_costs_the_others_its_timeout_once(bench_factory: Any) -> None:
    bench = await bench_factory(silent_units={"line1": {3}})
    timeout = 0.2
    base, _ = await bench.cycle("line1")  # includes the first timeout
    # Cycle with the silent unit after its first timeout: it is suspended and costs
    # nothing; the seven others deliver as usual.
    costs = []
    for _ in range(3):
        seconds, results = await bench.cycle("line1")
        costs.append(seconds)
        for device, readings in results:
            if device.unit_id == 3:
                assert isinstance(readings, DriverUnavailable)
                assert readings.reason == "timeout"
                assert "suspended" in str(readings)
            else:
                assert {r.tag: r.value for r in readings} == expected(device)
    healthy = await bench_factory([d for d in DEVICES if d.link == "line1"])
    await healthy.cycle("line1")
    clean = min([(await healthy.cycle("line1"))[0] for _ in range(3)])
    print(
        f"\nfirst cycle {base * 1000:.1f} ms, then {min(costs) * 1000:.1f} ms; "
        f"all units answering {clean * 1000:.1f} ms; timeout {timeout * 1000:.0f} ms"
    )
    # What the silent unit cost the line (the others wait exactly this long): its
    # timeout plus its request on the wire, once; then nothing (suspended, not re-sent).
    first, *later = bench.durations["line1-u3"]
    wire = 8 * 11 / 19200
    print(
        f"silent unit: {first * 1000:.1f} ms in the first cycle, then at most "
        f"{max(later) * 1000:.2f} ms"
    )
    assert timeout <= first <= timeout + wire + 0.03
    assert max(later) <= 0.005
    assert bench.links["line1"].stats.timeouts == 1
    # 7 units x 3 requests x 4 cycles, plus the one request the silent unit got; its
    # polls in the 3 later cycles were refused without a transaction.
    assert bench.links["line1"].stats.transactions == 7 * 3 * 4 + 1
    assert bench.links["line1"].stats.suspended == 3


async def test_noise_on_the_line_never_yields_a_good_wrong_value(bench_factory: Any) -> None:
    devices = [unit("line1", u, timeout_s=0.1) for u in range(1, 5)]
    bench = await bench_factory(devices, noise_every=3)
    good = bad = 0
    reasons: set[str] = set()
    for _ in range(10):
        _, results = await bench.cycle("line1")
        for device, readings in results:
            assert not isinstance(readings, Exception), readings
            for r in readings:
                if r.quality == "good":
                    assert r.value == expected(device)[r.tag]
                    good += 1
                else:
                    assert r.value is None
                    reasons.add(r.reason or "")
                    bad += 1
    assert bench.sim.spoiled >= 10
    print(f"\n{good} good, {bad} bad readings; {bench.sim.spoiled} answers damaged; {reasons}")
    assert reasons <= {
        "crc error",
        "protocol error: wrong unit id",
        "protocol error: incomplete frame",
        "protocol error: wrong byte count",
        "protocol error: wrong function code",
    }
    assert "crc error" in reasons
    assert "protocol error: incomplete frame" in reasons
    assert good > bad > 0


async def test_retries_hide_noise_from_the_data(bench_factory: Any) -> None:
    devices = [unit("line1", u, timeout_s=0.1, retries=2) for u in range(1, 5)]
    bench = await bench_factory(devices, noise_every=4)
    for _ in range(5):
        _, results = await bench.cycle("line1")
        for device, readings in results:
            assert {r.tag: r.value for r in readings} == expected(device)
    assert bench.links["line1"].stats.frame_errors >= 3


async def test_the_tcp_gateway_link_serves_many_units_over_one_connection() -> None:
    from drivers.links import TcpGatewayLink

    links: dict[str, Any] = {"gw": TcpGatewayLink(type="tcp", host="127.0.0.1", port=0)}
    devices = [unit("gw", u) for u in range(1, 9)]
    async with LinkSimulator(links, devices) as sim:
        link = Link("gw", sim.links["gw"])
        drivers = [ModbusDriver(d, link=link) for d in devices]
        for driver in drivers:
            await driver.connect()
        try:
            for _ in range(2):
                for driver in drivers:
                    readings = await driver.read("default")
                    assert {r.tag: r.value for r in readings} == expected(driver.device)
            assert link.stats.answered == 2 * 8 * 3
        finally:
            for driver in drivers:
                await driver.close()


async def test_a_tcp_gateway_link_pipelines_up_to_max_transactions() -> None:
    """A gateway that queues requests (answers each after a delay, in any order) over a
    real TCP connection: answers are matched by transaction id."""
    import random

    from drivers.links import TcpGatewayLink

    rng = random.Random(7)
    seen = {"max": 0, "now": 0}

    writers: list[asyncio.StreamWriter] = []
    handlers: list[asyncio.Task[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        current = asyncio.current_task()
        assert current is not None
        handlers.append(current)

        async def answer(req: bytes) -> None:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            await asyncio.sleep(rng.uniform(0.001, 0.02))
            count = int.from_bytes(req[10:12], "big")
            unit_id = req[6]
            if req[7] in (3, 4):
                payload = b"".join(unit_id.to_bytes(2, "big") for _ in range(count))
            else:
                payload = bytes((count + 7) // 8)
            pdu = bytes((req[7], len(payload))) + payload
            writer.write(req[0:4] + (len(pdu) + 1).to_bytes(2, "big") + bytes((unit_id,)) + pdu)
            seen["now"] -= 1

        tasks = set()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                req = await reader.readexactly(12)
                task = asyncio.create_task(answer(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = TcpGatewayLink(type="tcp", host="127.0.0.1", port=port, max_transactions=4)
    link = Link("gw", cfg)
    devices = [
        ModbusDevice.model_validate(
            {
                "name": f"g{u}",
                "protocol": "modbus",
                "link": "gw",
                "unit_id": u,
                "tags": [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
            }
        )
        for u in range(1, 9)
    ]
    drivers = [ModbusDriver(d, link=link) for d in devices]
    try:
        for driver in drivers:
            await driver.connect()
        for _ in range(5):
            results = await asyncio.gather(*(d.read("default") for d in drivers))
            for driver, readings in zip(drivers, results, strict=True):
                u = driver.device.unit_id
                assert [(r.value, r.quality) for r in readings] == [(u, "good"), (u, "good")]
        assert link.stats.answered == 5 * 8
        assert 2 <= link.stats.peak_in_flight <= 4
        assert seen["max"] <= 4
    finally:
        for driver in drivers:
            await driver.close()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


# ------------------------------------------------------------------ pymodbus as the peer


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked ptys from socat: (server end, client end)."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed (scripts/bootstrap installs it)")
    a, b = tmp_path / "server", tmp_path / "client"
    proc = subprocess.Popen(
        [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (a.exists() and b.exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("socat did not create its pty pair")
            time.sleep(0.02)
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(5)


def pymodbus_unit(device: ModbusDevice) -> Any:
    """pymodbus' own datastore holding `expected(device)`, encoded with our codec."""
    from pymodbus.simulator import DataType, SimData, SimDevice

    from drivers.modbus.codec import ValueSpec, encode

    values = expected(device)
    holding = encode(ValueSpec("float32", "CDAB"), values["power"]) + encode(
        ValueSpec("uint32", "CDAB"), values["energy"]
    )
    temp = encode(ValueSpec("int16"), values["temp"])
    u = device.unit_id
    return SimDevice(
        u,
        simdata=(
            [SimData(u, values=[True], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=holding, datatype=DataType.REGISTERS)],
            [SimData(4, values=temp, datatype=DataType.REGISTERS)],
        ),
    )


async def test_eight_units_on_pymodbus_rtu_servers(socat_pair: tuple[str, str]) -> None:
    """The done-when against a third-party peer: 8 units on one pty line served by
    pymodbus' serial server, 8 behind pymodbus' TCP server with RTU framing."""
    from pymodbus import FramerType
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    server_end, client_end = socat_pair
    line = [unit("line1", u) for u in range(1, 9)]
    nport = [unit("nport", u) for u in range(1, 9)]
    serial_server = ModbusSerialServer(
        [pymodbus_unit(d) for d in line], port=server_end, baudrate=19200, parity="N"
    )
    tcp_server = ModbusTcpServer(
        [pymodbus_unit(d) for d in nport], address=("127.0.0.1", 0), framer=FramerType.RTU
    )
    await serial_server.serve_forever(background=True)
    await tcp_server.serve_forever(background=True)
    drivers: list[ModbusDriver] = []
    try:
        port = cast(asyncio.Server, tcp_server.transport).sockets[0].getsockname()[1]
        links = {
            "line1": Link(
                "line1",
                SerialLink(type="serial", port=client_end, baud=19200, parity="N", stop_bits=2),
            ),
            "nport": Link(
                "nport", RtuOverTcpLink(type="rtu_over_tcp", host="127.0.0.1", port=port)
            ),
        }
        drivers = [ModbusDriver(d, link=links[d.link or ""]) for d in line + nport]
        for driver in drivers:
            await driver.connect()
        for _ in range(2):
            for driver in drivers:
                readings = await driver.read("default")
                assert {r.tag: r.value for r in readings} == expected(driver.device)
                assert {r.quality for r in readings} == {"good"}
        assert links["line1"].stats.answered == links["nport"].stats.answered == 2 * 8 * 3
    finally:
        for driver in drivers:
            await driver.close()
        await serial_server.shutdown()  # type: ignore[no-untyped-call]
        await tcp_server.shutdown()  # type: ignore[no-untyped-call]


async def test_pymodbus_rtu_server_is_read_over_a_pty(socat_pair: tuple[str, str]) -> None:
    from pymodbus.server import ModbusSerialServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    server_end, client_end = socat_pair
    devices = []
    for unit_id in (1, 2, 5):
        regs = SimData(
            0, values=[0x4148, 0x0000, unit_id, 0xFFFF - unit_id], datatype=DataType.REGISTERS
        )
        devices.append(
            SimDevice(
                unit_id,
                simdata=(
                    [SimData(0, values=[True] * 8, datatype=DataType.BITS)],
                    [SimData(0, values=[False], datatype=DataType.BITS)],
                    [regs],
                    [regs],
                ),
            )
        )
    server = ModbusSerialServer(devices, port=server_end, baudrate=19200, parity="N")
    await server.serve_forever(background=True)
    try:
        link = Link("peer", SerialLink(type="serial", port=client_end, baud=19200, parity="N"))
        found: dict[int, Any] = {}
        for unit_id in (1, 2, 5, 7):
            dev = ModbusDevice.model_validate(
                {
                    "name": f"peer{unit_id}",
                    "protocol": "modbus",
                    "link": "peer",
                    "unit_id": unit_id,
                    "timeout_s": 0.3,
                    "tags": [
                        {"name": "f", "address": 0, "type": "float32"},
                        {"name": "u", "address": 2, "type": "uint16"},
                        {"name": "i", "address": 3, "type": "int16"},
                    ],
                }
            )
            driver = ModbusDriver(dev, link=link)
            await driver.connect()
            try:
                found[unit_id] = await driver.read("default")
            except DriverUnavailable as exc:
                found[unit_id] = exc
            finally:
                await driver.close()
        for unit_id in (1, 2, 5):
            readings = found[unit_id]
            assert not isinstance(readings, Exception)
            assert [r.value for r in readings] == [12.5, unit_id, -1 - unit_id]
        # pymodbus' serial server answers a unit id it does not serve with exception 4
        # where a real RS-485 line stays silent.
        stray = found[7]
        assert not isinstance(stray, Exception)
        assert {(r.reason, r.code) for r in stray} == {
            ("modbus exception 4 (server device failure)", 4)
        }
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_pymodbus_rtu_framer_over_tcp_is_a_device_server() -> None:
    from pymodbus import FramerType
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    regs = SimData(0, values=[0x4148, 0x0000, 7], datatype=DataType.REGISTERS)
    bits = [SimData(0, values=[False], datatype=DataType.BITS)]
    server = ModbusTcpServer(
        [SimDevice(4, simdata=(bits, bits, [regs], [regs]))],
        address=("127.0.0.1", 0),
        framer=FramerType.RTU,
    )
    await server.serve_forever(background=True)
    try:
        port = cast(asyncio.Server, server.transport).sockets[0].getsockname()[1]
        link = Link("srv", RtuOverTcpLink(type="rtu_over_tcp", host="127.0.0.1", port=port))
        dev = ModbusDevice.model_validate(
            {
                "name": "srv4",
                "protocol": "modbus",
                "link": "srv",
                "unit_id": 4,
                "tags": [
                    {"name": "f", "address": 0, "type": "float32"},
                    {"name": "u", "address": 2, "type": "uint16"},
                ],
            }
        )
        driver = ModbusDriver(dev, link=link)
        await driver.connect()
        try:
            assert [r.value for r in await driver.read("default")] == [12.5, 7]
        finally:
            await driver.close()
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------ the CLI


async def test_probe_reads_decodes_and_scans_a_serial_line(tmp_path: Path) -> None:
    devices = [unit("line1", u) for u in (2, 5, 6)]
    async with LinkSimulator(LINKS, devices, silent_units={"line1": {6}}) as sim:
        cfg = sim.links["line1"]
        line = [
            "--serial",
            cfg.port,
            "--baud",
            str(cfg.baud),
            "--parity",
            cfg.parity,
            "--stop-bits",
            str(cfg.stop_bits),
        ]
        read = await _cli("probe", *line, "--unit", "5", "--count", "4")
        assert read.returncode == 0, read.stderr
        text = read.stdout
        assert "unit 5 on " in text
        # power = 15.5 as float32 CDAB at 0; energy = 100005 as uint32 CDAB at 2.
        row_f32 = next(x for x in text.splitlines() if x.split()[:2] == ["0", "u32"])
        assert row_f32  # the 32-bit table starts at address 0
        f32 = next(x for x in text.splitlines() if x.split()[:1] == ["f32"])
        assert f32.split()[2] == "15.5"  # the CDAB column
        u32_at_2 = next(x for x in text.splitlines() if x.split()[:2] == ["2", "u32"])
        assert u32_at_2.split()[3] == "100005"
        scan = await _cli("probe", *line, "--scan", "--units", "1-8", "--timeout-s", "0.05")
        assert scan.returncode == 0, scan.stderr
        assert scan.stdout.splitlines()[-1] == "2 units answered: 2, 5"
        silent = await _cli("probe", *line, "--unit", "6", "--timeout-s", "0.05")
        assert silent.returncode == 1
        assert silent.stderr.startswith("probe: unit 6: timeout")
        # A device of a config: its link, unit id and timeout.
        config = tmp_path / "line.yaml"
        config.write_text(
            "agent: {id: gw-1}\n"
            f"links: {{line1: {{type: serial, port: {cfg.port}, baud: {cfg.baud}, "
            f"parity: {cfg.parity}, stop_bits: {cfg.stop_bits}}}}}\n"
            "devices:\n"
            "  - {name: meter-5, protocol: modbus, link: line1, unit_id: 5,"
            " tags: [{name: t, address: 0}]}\n"
        )
        by_name = await _cli("probe", str(config), "--device", "meter-5", "--count", "2")
        assert by_name.returncode == 0, by_name.stderr
        assert by_name.stdout.startswith(f"unit 5 on {cfg.port}")
        missing = await _cli("probe", str(config), "--device", "nope")
        assert missing.returncode == 2
        assert missing.stderr == f"probe: no Modbus device 'nope' in {config}\n"


async def test_plan_prints_each_links_bus_time() -> None:
    root = Path(__file__).parents[2]
    result = await _cli("plan", str(root / "configs" / "modbus-serial-line.yaml"))
    assert result.returncode == 0, result.stderr
    assert "link line1 (serial /dev/ttyUSB0, 19200 baud, 8 units)" in result.stdout
    assert "line load" in result.stdout


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


# ------------------------------------------------------------------ the example configs


@pytest.mark.parametrize("name", ["modbus-serial-line.yaml", "modbus-serial-gateway.yaml"])
async def test_example_configs_deliver_against_the_link_simulator(name: str) -> None:
    """What simulator mode does with a serial config, wired as the runtime will: the
    LinkSimulator serves the config's links, one Link per link, the agent's DevicePoller
    with ModbusDriver per device; every device delivers all its tags good."""
    from agent.config import load_config
    from agent.poller import DevicePoller

    config = load_config(Path(__file__).parents[2] / "configs" / name)
    devices = [d for d in config.devices if isinstance(d, ModbusDevice)]
    polls: dict[str, list[bool]] = {}

    def sink_for(device: str) -> Any:
        async def sink(readings: Any) -> None:
            polls.setdefault(device, []).append(all(r.quality == "good" for r in readings))

        return sink

    async with LinkSimulator(dict(config.links), devices) as sim:
        links = {n: Link(n, c) for n, c in sim.links.items()}
        pollers = [
            DevicePoller(
                d,
                "modbus",
                ModbusDriver(d, link=links[d.link or ""]),
                {g: [t.name for t in d.tags if t.group == g] for g in d.group_intervals()},
                sink_for(d.name),
            )
            for d in devices
        ]
        tasks = [asyncio.create_task(p.run()) for p in pollers]
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while len([d for d in devices if any(polls.get(d.name, []))]) < len(devices):
                assert asyncio.get_running_loop().time() < deadline, polls
                await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in links.values():
                await link.close()
    assert len(devices) == 8
    for device in devices:
        assert all(polls[device.name]), (device.name, polls[device.name])


async def test_a_port_that_refuses_rs485_mode_is_unavailable_with_the_reason() -> None:
    """A pty has no RS-485 ioctl, like an adapter whose driver lacks TIOCSRS485."""
    from drivers.links import LinkError, Rs485Settings

    devices = [unit("line1", 1)]
    async with LinkSimulator(LINKS, devices) as sim:
        cfg = sim.links["line1"].model_copy(update={"rs485": Rs485Settings()})
        link = Link("line1", cfg)
        with pytest.raises(LinkError) as err:
            await link.acquire()
        assert (err.value.kind, err.value.reason) == ("unavailable", "port unavailable")
        assert "RS485" in str(err.value)
        # Without it the same port works.
        plain = Link("line1", sim.links["line1"])
        driver = ModbusDriver(devices[0], link=plain)
        await driver.connect()
        try:
            assert {r.tag: r.value for r in await driver.read("default")} == expected(devices[0])
        finally:
            await driver.close()


async def test_pymodbus_serial_server_answers_unknown_units_even_when_told_not_to(
    socat_pair: tuple[str, str],
) -> None:
    """pymodbus 3.16 with its SimDevice datastore answers a unit id it does not serve
    with exception 4 even with ignore_missing_devices=True (its SimCore looks the unit
    up with a fallback to unit 0 and raises KeyError, not NoSuchIdException). The agent
    reports exactly that for the stray unit; the served unit is unaffected."""
    from pymodbus.server import ModbusSerialServer

    server_end, client_end = socat_pair
    served = unit("line1", 1)
    server = ModbusSerialServer(
        [pymodbus_unit(served)],
        port=server_end,
        baudrate=19200,
        parity="N",
        ignore_missing_devices=True,
    )
    await server.serve_forever(background=True)
    try:
        link = Link("line1", SerialLink(type="serial", port=client_end, parity="N", stop_bits=2))
        stray = ModbusDriver(unit("line1", 7, timeout_s=0.1), link=link)
        good = ModbusDriver(served, link=link)
        for driver in (stray, good):
            await driver.connect()
        readings = await stray.read("default")
        assert {(r.quality, r.code) for r in readings} == {("bad", 4)}
        assert {r.tag: r.value for r in await good.read("default")} == expected(served)
        for driver in (stray, good):
            await driver.close()
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]
