"""The test broker can always be restarted on its port: the port is outside the OS's
ephemeral range (no outgoing connection takes it while the broker is down), and a
start waits for a port another socket still holds for a moment."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.broker import BrokerError, MosquittoBroker, free_port, require_mosquitto

pytestmark = pytest.mark.integration


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low, _ = ephemeral_range()
    ports = {free_port() for _ in range(50)}
    assert all(10_000 <= p < low for p in ports), sorted(ports)
    assert len(ports) > 40  # random, not one fixed port
    for p in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def hold(port: int) -> tuple[socket.socket, socket.socket]:
    """An outgoing connection whose source port is `port` (what an ephemeral port that
    happened to be the broker's looks like), to a listener of its own."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.socket()
    client.bind(("127.0.0.1", port))
    client.connect(server.getsockname())
    return server, client


def release(*socks: socket.socket) -> None:
    for s in socks:
        s.close()


def test_a_restart_waits_for_a_port_held_for_a_moment() -> None:
    require_mosquitto()
    broker = MosquittoBroker().start()
    try:
        port = broker.port
        broker.stop()
        held = hold(port)
        threading.Timer(1.5, release, held).start()
        t0 = time.monotonic()
        broker.start()
        assert time.monotonic() - t0 >= 1.0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        broker.stop()


def test_a_port_held_for_good_still_fails_the_start_with_the_reason() -> None:
    require_mosquitto()
    import tests.support.broker as support

    broker = MosquittoBroker().start()
    saved = support._BUSY_RETRY_S
    support._BUSY_RETRY_S = 1.0
    held: tuple[socket.socket, ...] = ()
    try:
        port = broker.port
        broker.stop()
        held = hold(port)
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start()
    finally:
        support._BUSY_RETRY_S = saved
        release(*held)
        broker.stop()
