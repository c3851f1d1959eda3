"""Benchmark: MqttPublisher throughput and client CPU per message against a real mosquitto.

Run from the repository root:

    .venv/bin/python -m bench.mqtt_publish

Starts a local mosquitto (max_inflight_messages 1000, so the broker's Receive Maximum does
not cap the window), then for ~1 KB and ~50 KB payloads and max_inflight 10 / 100 / 1000
publishes one batch of messages at QoS 1 through one publish() call and prints messages/s,
MB/s and this process's CPU time per message (user + system, all threads). No subscriber
is connected, so mosquitto answers each PUBLISH with PUBACK 0x10 (no matching
subscribers), which counts as delivered. Bounded to well under 20 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass

import structlog

from agent.config import MqttConfig
from agent.publish import Message
from agent.publish.mqtt import MqttPublisher
from tests.support.broker import MosquittoBroker, mosquitto_path

PAYLOADS = ((1024, 20_000), (50 * 1024, 3_000))  # (payload bytes, messages per run)
WINDOWS = (10, 100, 1000)
BUDGET_S = 15.0  # the whole benchmark stops starting new runs after this


@dataclass(frozen=True)
class Run:
    size: int
    window: int
    messages: int
    ok: int
    wall_s: float
    cpu_s: float

    def line(self) -> str:
        rate = self.messages / self.wall_s
        mb_s = rate * self.size / 1e6
        cpu_us = self.cpu_s / self.messages * 1e6
        return (
            f"{self.size // 1024:>4} KB  max_inflight {self.window:>5}  "
            f"{self.messages:>5} msgs  {rate:>9,.0f} msg/s  {mb_s:>7.1f} MB/s  "
            f"{cpu_us:>7.1f} µs CPU/msg  ok {self.ok}/{self.messages}"
        )


async def one_run(broker: MosquittoBroker, size: int, window: int, count: int) -> Run:
    config = MqttConfig(host=broker.host, port=broker.port, max_inflight=window)
    pub = MqttPublisher(config, f"bench-{size}-{window}")
    await pub.start()
    try:
        async with asyncio.timeout(10):
            await pub.wait_connected()
        payload = os.urandom(size)
        messages = [Message(f"bench/{size}", payload) for _ in range(count)]
        await pub.publish(messages[:50])  # warm up the connection and code paths
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await pub.publish(messages)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert pub.stats().window == window, pub.stats()
        return Run(size, window, count, sum(r.ok for r in results), wall, cpu)
    finally:
        await pub.close()


async def main() -> int:
    if mosquitto_path() is None:
        print("mosquitto is not installed", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    with MosquittoBroker(
        extra_config=["max_inflight_messages 1000", "message_size_limit 0"],
        log_types=("error", "warning"),
    ) as broker:
        print(f"mosquitto on {broker.host}:{broker.port}; python {sys.version.split()[0]}")
        for size, count in PAYLOADS:
            for window in WINDOWS:
                if time.perf_counter() - started > BUDGET_S:
                    print("time budget reached; remaining runs skipped")
                    return 0
                print((await one_run(broker, size, window, count)).line(), flush=True)
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
