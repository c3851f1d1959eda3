"""Broker link faults between the real agent and a real mosquitto, injected by a TCP
proxy: the link cut (refused), and a black hole (accepted, never answered — the case
where data is sent into a dead link before anyone notices). The subscriber talks to the
broker directly and must see every seq, in order per device, with duplicates bounded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.agent_proc import (
    AgentProcess,
    assert_continuous,
    counter_device,
    last_seq_logged,
    samples_of,
    seqs,
    wait_until,
)
from tests.support.broker import MosquittoBroker
from tests.support.proxy import FaultProxy
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def config_via(tmp: Path, port: int) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent: {{id: gw-link}}
mqtt:
  port: {port}
  keepalive_s: 5
  publish_timeout_s: 2
  reconnect_min_s: 0.2
  reconnect_max_s: 1
buffer: {{path: {tmp / "buffer.db"}}}
logging: {{level: info, format: json}}
devices:
{counter_device("line-a")}{counter_device("line-b", 0.25)}"""
    )
    return path


def in_order_per_device(tmp_messages: list[dict[str, object]]) -> None:
    """First deliveries of each device's samples arrive in seq order."""
    seen: set[int] = set()
    last: dict[str, int] = {}
    for s in tmp_messages:
        seq = int(s["seq"])  # type: ignore[call-overload]
        if seq in seen:
            continue  # a duplicate (re-sent after the link died): allowed, bounded
        seen.add(seq)
        device = str(s["device"])
        assert seq > last.get(device, 0), f"{device}: seq {seq} after {last[device]}"
        last[device] = seq


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_link_fault_loses_nothing(tmp_path: Path, broker: MosquittoBroker, fault: str) -> None:
    with (
        FaultProxy("127.0.0.1", broker.port) as proxy,
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        AgentProcess(
            tmp_path / "agent.log", "run", str(config_via(tmp_path, proxy.port)), "--simulate"
        ) as agent,
    ):
        wait_until(lambda: len(sub.messages()) >= 10, 60, "first messages", agent)
        proxy.set_mode(fault)  # type: ignore[arg-type]
        time.sleep(8)
        proxy.set_mode("pass")
        target = max(seqs(sub.messages())) + 300
        wait_until(lambda: max(seqs(sub.messages())) > target, 90, "backlog", agent)
        assert agent.terminate() == 0
        produced = last_seq_logged(agent)
        wait_until(lambda: max(seqs(sub.messages())) >= produced, 30, "the last sample")
    received = seqs(sub.messages())
    assert_continuous(received)
    assert max(received) == produced
    assert len(received) - len(set(received)) <= 2 * 100 * 20  # in-flight window × rounds
    in_order_per_device(samples_of(sub.messages()))
    log = agent.log()
    assert '"mqtt.disconnected"' in log or '"mqtt.connect.failed"' in log
