"""Modbus fault behaviour: dead, silent, slow and resetting links, exception responses
inside merged blocks, malformed frames.

Driver-level tests run ModbusDriver against tests/support/bad_modbus.py (a raw asyncio
server that misbehaves on demand). End-to-end tests run the real agent process against
a real mosquitto, with the real simulator behind tests/support/proxy.py FaultProxy (link
faults) or bad_modbus (frames), and assert on what a subscriber receives: bad quality
with the exact reason for the faulty device, good values again once the fault is gone,
and a healthy second device that stays good and in order throughout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.base import DriverUnavailable, RawReading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from tests.support.agent_proc import AgentProcess, samples_of
from tests.support.bad_modbus import BadModbusServer, Mode, Seen, register_value
from tests.support.broker import MosquittoBroker
from tests.support.proxy import FaultProxy
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


@pytest.fixture
def server() -> Iterator[BadModbusServer]:
    with BadModbusServer() as s:
        yield s


def device(port: int, tags: list[dict[str, Any]], **extra: Any) -> ModbusDevice:
    fields: dict[str, Any] = {
        "name": "plc",
        "protocol": "modbus",
        "host": "127.0.0.1",
        "port": port,
        "timeout_s": 0.3,
        "retries": 0,
        "tags": tags,
        **extra,
    }
    return ModbusDevice.model_validate(fields)


def registers(*addresses: int, type_: str = "uint16") -> list[dict[str, Any]]:
    return [{"name": f"r{a}", "address": a, "type": type_} for a in addresses]


def summary(readings: list[RawReading]) -> list[tuple[str, Any, str, int | None]]:
    return [(r.tag, r.value, r.quality, r.code) for r in readings]


ILLEGAL = "modbus exception 2 (illegal data address)"

# ------------------------------------------------------------ driver: block isolation


async def test_illegal_address_in_a_merged_block_is_isolated_with_few_requests(
    server: BadModbusServer,
) -> None:
    server.set_illegal({13})
    driver = ModbusDriver(device(server.port, registers(*range(10, 18))), isolation_retry_s=3600)
    await driver.connect()
    try:
        with capture_logs() as logs:
            first = await driver.read("default")
            probes = server.request_count()
            second = await driver.read("default")
            third = await driver.read("default")
    finally:
        await driver.close()
    expected: list[tuple[str, Any, str, int | None]] = [
        (f"r{a}", register_value(a), "good", None) for a in range(10, 18)
    ]
    expected[3] = ("r13", None, "bad", 2)
    assert summary(first) == expected
    assert summary(second) == summary(third) == expected
    assert first[3].reason == ILLEGAL
    # Following polls read exactly the good parts around the refused register: 2 requests.
    assert [(r.start, r.count) for r in driver.active_requests("default")] == [(10, 3), (14, 4)]
    assert server.seen()[probes:] == [Seen(3, 10, 3), Seen(3, 14, 4)] * 2
    isolated = [e for e in logs if e["event"] == "modbus.block.isolated"]
    assert len(isolated) == 1  # once, not per poll
    assert isolated[0]["log_level"] == "warning"
    assert isolated[0]["bad"] == ["holding 13"]
    assert isolated[0]["bad_tags"] == ["r13"]
    assert isolated[0]["reason"] == ILLEGAL


async def test_isolated_block_is_retried_and_merged_back_when_the_plc_is_fixed(
    server: BadModbusServer,
) -> None:
    server.set_illegal({11, 12})
    dev = device(
        server.port, [*registers(10, 11, 14), {"name": "f", "address": 12, "type": "float32"}]
    )
    driver = ModbusDriver(dev, isolation_retry_s=0.0)  # every poll retries the whole block
    await driver.connect()
    try:
        with capture_logs() as logs:
            bad = await driver.read("default")
            again = await driver.read("default")  # retried, still refused: logged once
            server.set_illegal(set())
            before = server.request_count()
            fixed = await driver.read("default")
            after = server.request_count()
            await driver.read("default")
    finally:
        await driver.close()
    assert [(r.tag, r.quality, r.code) for r in bad] == [
        ("r10", "good", None),
        ("r11", "bad", 2),
        ("r14", "good", None),
        ("f", "bad", 2),  # a float32 at 12..13 is never split, even to find 12 alone
    ]
    assert summary(again) == summary(bad)
    assert all(r.quality == "good" for r in fixed)
    assert after - before == 1  # the static block again, one request
    assert [(r.start, r.count) for r in driver.active_requests("default")] == [(10, 5)]
    events = [e["event"] for e in logs if e["event"].startswith("modbus.block.")]
    assert events == ["modbus.block.isolated", "modbus.block.recovered"]
    isolated = next(e for e in logs if e["event"] == "modbus.block.isolated")
    assert isolated["bad"] == ["holding 11", "holding 12..13"]


async def test_single_refused_tag_is_parked_until_the_retry(server: BadModbusServer) -> None:
    server.set_illegal({20})
    driver = ModbusDriver(device(server.port, registers(0, 20)), isolation_retry_s=3600)
    await driver.connect()
    try:
        await driver.read("default")
        before = server.request_count()
        readings = await driver.read("default")
    finally:
        await driver.close()
    assert summary(readings) == [("r0", 1000, "good", None), ("r20", None, "bad", 2)]
    assert server.seen()[before:] == [Seen(3, 0, 1)]  # the refused register is not re-read


async def test_other_exceptions_do_not_isolate(server: BadModbusServer) -> None:
    # Exception 6 (busy) concerns the device, not addresses: no splitting, no parking.
    server.set_illegal({1})
    server.set_mode("busy")
    driver = ModbusDriver(device(server.port, registers(0, 1, 2)))
    await driver.connect()
    try:
        with capture_logs() as logs:
            readings = await driver.read("default")
            again = await driver.read("default")
    finally:
        await driver.close()
    assert summary(readings) == summary(again) == [(f"r{a}", None, "bad", 6) for a in range(3)]
    assert readings[0].reason == "modbus exception 6 (server device busy)"
    assert server.seen() == [Seen(3, 0, 3)] * 2
    assert not [e for e in logs if e["event"] == "modbus.block.isolated"]


# ------------------------------------------------------------ driver: malformed frames

FRAME_FAULTS: list[tuple[Mode, str]] = [
    ("wrong_tid", "protocol error: wrong transaction id"),
    ("wrong_unit", "protocol error: wrong unit id"),
    ("wrong_protocol", "protocol error: wrong protocol id"),
    ("wrong_function", "protocol error: wrong function code"),
    ("short_count", "protocol error: wrong byte count"),
    ("long_count", "protocol error: wrong byte count"),
    ("bad_length", "protocol error: incomplete frame"),
    ("garbage", "protocol error: wrong protocol id"),
    ("extra", "protocol error: unexpected data"),
    ("silent", "timeout"),
    ("slow", "timeout"),
    ("close_after", "connection lost"),
]


@pytest.mark.parametrize(("mode", "reason"), FRAME_FAULTS)
@pytest.mark.parametrize("table", ["holding", "coil"])
async def test_malformed_answer_is_never_a_value_and_the_next_connection_reads_well(
    server: BadModbusServer, mode: Mode, reason: str, table: str
) -> None:
    tags = [{"name": "a", "address": 10, "type": "uint16" if table == "holding" else "bool"}]
    tags[0]["table"] = table
    driver = ModbusDriver(device(server.port, tags, retries=1, timeout_s=0.2))
    server.set_mode(mode, delay_s=1.0, close_after_bytes=5)
    await driver.connect()
    try:
        with pytest.raises(DriverUnavailable) as raised:
            await driver.read("default")
        assert raised.value.reason == reason
        # What the poller does next: close, reconnect, read again.
        server.set_mode("ok")
        await driver.close()
        await driver.connect()
        (reading,) = await driver.read("default")
    finally:
        await driver.close()
    assert reading.quality == "good"
    assert reading.value == (register_value(10) if table == "holding" else False)


async def test_stray_bytes_between_polls_fail_the_next_request(server: BadModbusServer) -> None:
    driver = ModbusDriver(device(server.port, registers(0)))
    await driver.connect()
    try:
        server.set_mode("extra")  # the answer is fine, then one byte too many
        with pytest.raises(DriverUnavailable, match="unexpected data"):
            await driver.read("default")
        server.set_mode("ok")
        with pytest.raises(DriverUnavailable, match="unexpected data"):
            await driver.read("default")  # same connection: still refused
    finally:
        await driver.close()


# ------------------------------------------------------------ end to end


def write_config(tmp: Path, broker: MosquittoBroker, devices: str) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent:
  id: gw-test
mqtt:
  host: 127.0.0.1
  port: {broker.port}
buffer:
  path: {tmp / "buffer.db"}
logging:
  level: info
  format: json
devices:
{devices}
"""
    )
    return path


def modbus_device(name: str, port: int, tags: str, **extra: Any) -> str:
    keys = {
        "interval_s": 0.2,
        "timeout_s": 0.3,
        "retries": 0,
        "backoff_min_s": 0.2,
        "backoff_max_s": 0.5,
        **extra,
    }
    lines = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return (
        f"  - name: {name}\n    protocol: modbus\n    host: 127.0.0.1\n    port: {port}\n"
        f"{lines}    tags:\n{tags}"
    )


TWO_TAGS = (
    "      - {name: a, address: 0, type: uint16}\n      - {name: b, address: 1, type: uint16}\n"
)


class Watch:
    """What the subscriber has received, by device."""

    def __init__(self, sub: Subscriber, agent: AgentProcess) -> None:
        self.sub = sub
        self.agent = agent

    def samples(self) -> list[dict[str, Any]]:
        return samples_of(self.sub.messages())

    def mark(self) -> int:
        return len(self.samples())

    def wait(self, since: int, device: str, quality: str, reason: str | None = None) -> None:
        """Wait until a sample of `device` with `quality` (and `reason`) arrives after
        sample number `since`."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for s in self.samples()[since:]:
                if (s["device"], s["quality"]) == (device, quality) and (
                    reason is None or s["reason"] == reason
                ):
                    return
            time.sleep(0.05)
        seen = {
            (s["quality"], s["reason"]) for s in self.samples()[since:] if s["device"] == device
        }
        raise AssertionError(
            f"{device}: no {quality} sample with reason {reason!r}; seen {seen}\n{self.agent.log()}"
        )

    def fault(self, device: str, reason: str, switch_on: Any, switch_off: Any) -> None:
        since = self.mark()
        switch_on()
        self.wait(since, device, "bad", reason)
        since = self.mark()
        switch_off()
        self.wait(since, device, "good")

    def assert_healthy(self, device: str) -> None:
        mine = [s for s in self.samples() if s["device"] == device]
        assert mine, f"no samples of {device}"
        bad = [s for s in mine if s["quality"] != "good"]
        assert not bad, bad[:5]
        numbers = [int(s["seq"]) for s in mine]
        assert numbers == sorted(set(numbers)), "out of order or duplicated"
        # The seq counter is shared by all devices: the healthy device's samples have
        # gaps only where another device's samples were numbered, never a lost one.
        every = sorted({int(s["seq"]) for s in self.samples()})
        assert every == list(range(every[0], every[-1] + 1)), "seq gap"


@pytest.fixture
def simulated(tmp_path: Path, broker: MosquittoBroker) -> Iterator[int]:
    """`edge-agent simulate` serving the device `plc`; yields its port."""
    config = write_config(tmp_path, broker, modbus_device("plc", 0, TWO_TAGS))
    with AgentProcess(tmp_path / "sim.log", "simulate", str(config)) as sim:
        name, _, endpoint = sim.read_line().split("\t")
        assert name == "plc"
        yield int(endpoint.rsplit(":", 1)[1])


def test_link_faults_give_the_exact_reason_and_recover(
    tmp_path: Path, broker: MosquittoBroker, simulated: int
) -> None:
    # The faulty device is the real simulator behind the proxy; the healthy one is served
    # by a well-behaved bad_modbus server.
    with FaultProxy("127.0.0.1", simulated) as proxy, BadModbusServer() as healthy:
        config = write_config(
            tmp_path,
            broker,
            modbus_device("healthy", healthy.port, TWO_TAGS)
            + modbus_device("plc", proxy.port, TWO_TAGS),
        )
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent,
        ):
            watch = Watch(sub, agent)
            watch.wait(0, "plc", "good")

            def back() -> None:
                proxy.set_mode("pass")

            watch.fault("plc", "connection lost", lambda: proxy.set_mode("cut"), back)
            watch.fault("plc", "timeout", lambda: proxy.set_mode("blackhole"), back)
            watch.fault("plc", "timeout", lambda: proxy.set_mode("delay", delay_s=1.0), back)
            watch.fault(
                "plc",
                "connection lost",
                lambda: proxy.set_mode("reset_after", reset_after_bytes=30),
                back,
            )
            assert agent.terminate() == 0
    watch.assert_healthy("healthy")
    log = agent.log()
    assert log.count('"device.down"') >= 4
    assert '"device.recovered"' in log
    assert "Traceback" not in log


def test_malformed_frames_give_the_exact_reason_and_recover(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    with BadModbusServer() as healthy, BadModbusServer() as bad:
        config = write_config(
            tmp_path,
            broker,
            modbus_device("healthy", healthy.port, TWO_TAGS)
            + modbus_device("plc", bad.port, TWO_TAGS),
        )
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent,
        ):
            watch = Watch(sub, agent)
            watch.wait(0, "plc", "good")
            for mode, reason in FRAME_FAULTS:
                if mode == "slow":
                    continue  # a delay is a link fault, covered through the proxy
                watch.fault(
                    "plc",
                    reason,
                    lambda mode=mode: bad.set_mode(mode, close_after_bytes=5),
                    lambda: bad.set_mode("ok"),
                )
            assert agent.terminate() == 0
    watch.assert_healthy("healthy")
    values = {(s["tag"], s["value"]) for s in watch.samples() if s["quality"] == "good"}
    # Never a value that is not in the device: wrong function codes, short or long
    # counts and garbage never became samples.
    assert values == {("a", register_value(0)), ("b", register_value(1))}
    assert "Traceback" not in agent.log()


def test_illegal_address_inside_a_merged_block_fails_only_that_tag(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    tags = "".join(f"      - {{name: r{a}, address: {a}, type: uint16}}\n" for a in range(8))
    with BadModbusServer(illegal={5}) as plc, BadModbusServer() as healthy:
        config = write_config(
            tmp_path,
            broker,
            modbus_device("healthy", healthy.port, TWO_TAGS) + modbus_device("plc", plc.port, tags),
        )
        with (
            Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config)) as agent,
        ):
            watch = Watch(sub, agent)
            watch.wait(0, "plc", "good")
            since = watch.mark()
            watch.wait(since, "plc", "good")  # a second poll, after the isolation
            assert agent.terminate() == 0
        polls = [s for s in watch.samples() if s["device"] == "plc"]
        for s in polls:
            if s["tag"] == "r5":
                assert (s["quality"], s["reason"], s["code"]) == ("bad", ILLEGAL, 2)
            else:
                assert (s["quality"], s["value"]) == ("good", register_value(int(s["tag"][1:])))
        seen = plc.seen()
        # The static block and the refused register were read once (during isolation);
        # following polls read 0..4 and 6..7 only.
        assert seen.count(Seen(3, 0, 8)) == 1
        assert seen.count(Seen(3, 5, 1)) == 1
        assert seen.count(Seen(3, 6, 2)) >= 2
        assert set(seen) == {
            Seen(3, 0, 8),
            Seen(3, 0, 4),
            Seen(3, 4, 4),
            Seen(3, 4, 2),
            Seen(3, 4, 1),
            Seen(3, 5, 1),
            Seen(3, 6, 2),
            Seen(3, 0, 5),
        }
    watch.assert_healthy("healthy")
    log = agent.log()
    assert log.count('"modbus.block.isolated"') == 1
    assert '"bad": ["holding 5"]' in log or '"bad":["holding 5"]' in log
