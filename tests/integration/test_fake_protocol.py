"""A protocol added from a test only — the fake one, registered here, no file under agent/
touched — runs like a built-in: `run --simulate` serves and polls it next to a Modbus
device, and the runtime turns its scripted failures into bad samples, against a real
mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import _run
from agent.config import load_config
from agent.runtime import Agent
from agent.simulate import simulators
from drivers import registry
from drivers.base import DriverUnavailable
from drivers.fake import FakeBench
from tests.support.agent_proc import samples_of
from tests.support.broker import MosquittoBroker
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


@pytest.fixture
def bench() -> Iterator[FakeBench]:
    bench = FakeBench()
    with registry.registered(bench.protocol()):
        yield bench


def plant(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "plant.yaml"
    path.write_text(
        f"""\
agent: {{id: gw}}
mqtt: {{port: {port}}}
buffer: {{path: {tmp_path / "buffer.db"}}}
devices:
  - name: oven
    protocol: fake
    endpoint: fake://line1
    interval_s: 0.05
    backoff_min_s: 0.05
    backoff_max_s: 0.1
    tags:
      - {{name: temp, unit: degC, scale: 0.5, simulate: {{generator: constant, value: 43}}}}
  - name: stuck
    protocol: fake
    endpoint: fake://line1
    interval_s: 0.05
    timeout_s: 0.05
    retries: 0
    tags:
      - {{name: level, type: int, simulate: {{generator: constant, value: 3}}}}
  - name: press
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: 0.05
    tags:
      - {{name: p, address: 0, simulate: {{generator: constant, value: 9}}}}
""",
        encoding="utf-8",
    )
    return path


def of(sub: Subscriber, device: str) -> list[dict[str, object]]:
    return [s for s in samples_of(sub.messages()) if s.get("device") == device]


async def wait_for(cond: object, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_run_simulate_serves_and_polls_a_protocol_registered_by_the_test(
    tmp_path: Path, broker: MosquittoBroker, bench: FakeBench
) -> None:
    path = plant(tmp_path, broker.port)
    with Subscriber("127.0.0.1", broker.port, "edge/#") as sub:
        # `edge-agent run plant.yaml --simulate`, in this process so it sees the test's
        # registration; SIGTERM stops it as it would the service.
        task = asyncio.create_task(_run(load_config(path), str(path), simulate=True, grace_s=2))
        try:
            await wait_for(
                lambda: (
                    (len(of(sub, "oven")) >= 3 and of(sub, "stuck") and of(sub, "press"))
                    or task.done()
                )
            )
            assert not task.done(), task
        finally:
            # Only while the agent's handler is installed: SIGTERM must never hit pytest.
            if not task.done() and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                task.cancel()
            async with asyncio.timeout(30):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    oven = of(sub, "oven")
    assert {(s["value"], s["quality"], s["unit"]) for s in oven} == {(21.5, "good", "degC")}
    assert {(s["value"], s["quality"]) for s in of(sub, "stuck")} == {(3, "good")}
    assert {(s["value"], s["quality"]) for s in of(sub, "press")} == {(9, "good")}
    # Both fake devices were served by one simulated server, at the endpoint they share.
    sim = bench.simulators[0]
    assert sim.endpoints == {"oven": "fake://sim1", "stuck": "fake://sim1"}
    assert bench.network.servers == {}  # the simulator stopped with the agent


async def test_runtime_turns_scripted_failures_into_bad_samples_and_others_keep_going(
    tmp_path: Path, broker: MosquittoBroker, bench: FakeBench
) -> None:
    config = load_config(plant(tmp_path, broker.port))
    bench.script("oven").connect(error=DriverUnavailable("refused", "by the script")).read(
        error=DriverUnavailable("timeout", "no answer")
    )
    bench.script("stuck").read(hang_s=math.inf)  # the poller's read guard must end it
    with Subscriber("127.0.0.1", broker.port, "edge/#") as sub:
        async with simulators(config) as simulated:
            agent = Agent(simulated, grace_s=2)
            task = asyncio.create_task(agent.run())
            try:
                await wait_for(
                    lambda: (
                        any(s["quality"] == "good" for s in of(sub, "oven"))
                        and any(s["quality"] == "good" for s in of(sub, "stuck"))
                    )
                )
                # While `stuck` hung, the other devices kept their schedule.
                hung = [s for s in of(sub, "stuck") if s["quality"] == "bad"]
                assert hung
                assert {s["reason"] for s in hung} == {"timeout"}
                oven_good = [s for s in of(sub, "oven") if s["quality"] == "good"]
                assert len(oven_good) > 10
                assert len(of(sub, "press")) > 10
            finally:
                agent.stop()
                await task
    reasons = [s["reason"] for s in of(sub, "oven") if s["quality"] == "bad"]
    assert reasons[0] == "refused"
    # Still down when the read timed out: reported with the outage, not again per poll.
    assert set(reasons) <= {"refused", "timeout"}
    assert of(sub, "oven")[-1]["value"] == 21.5
    outcomes = [(c.op, c.outcome) for c in bench.calls_of("oven") if c.op != "close"][:3]
    assert outcomes == [
        ("connect", "DriverUnavailable: refused: by the script"),
        ("connect", "ok"),
        ("read", "DriverUnavailable: timeout: no answer"),
    ]
