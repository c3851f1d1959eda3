"""Prometheus metrics, read from the pipeline's own figures at scrape time.

A custom collector (no counters updated on the hot path): each scrape reads
DeviceStatus, AgentStatus, buffer.stats(), forwarder.stats and the publisher's stats()
and turns them into metric families. Every name starts with `edge_agent_`; the list with
meanings is in docs/operating.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.http.status import buffer_writable, publisher_stats, readiness

if TYPE_CHECKING:
    from agent.runtime import Agent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEVICE_STATES = ("starting", "up", "down")


class AgentCollector(Collector):
    """Reads one Agent's figures on every collect()."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield from self._agent()
        yield from self._devices()
        yield from self._buffer()
        yield from self._mqtt()

    def _agent(self) -> Iterator[Metric]:
        a = self.agent
        info = InfoMetricFamily("edge_agent", "The agent's identity.")
        info.add_metric([], {"version": __version__, "agent": a.config.agent.id})
        yield info
        yield GaugeMetricFamily(
            "edge_agent_start_time_seconds",
            "When the agent started (Unix time).",
            value=a.status.started,
        )
        yield GaugeMetricFamily(
            "edge_agent_ready", "1 while /readyz answers 200.", value=1 if readiness(a)[0] else 0
        )
        f = a.forwarder.stats if a.forwarder is not None else None
        yield CounterMetricFamily(
            "edge_agent_samples_produced",
            "Samples read from devices and written to the buffer.",
            value=a.status.samples_produced,
        )
        yield CounterMetricFamily(
            "edge_agent_samples_published",
            "Samples delivered to the broker (acknowledged) and removed from the buffer.",
            value=f.samples_delivered if f else 0,
        )
        yield CounterMetricFamily(
            "edge_agent_records_published",
            "Buffer records (one poll's batch each) delivered to the broker.",
            value=f.records_sent if f else 0,
        )
        dropped = CounterMetricFamily(
            "edge_agent_samples_dropped",
            "Samples lost, by reason: buffer_full (the when_full policy) or buffer_error "
            "(an append failed, e.g. disk full).",
            labels=["reason"],
        )
        dropped.add_metric(["buffer_full"], a.buffer.stats().dropped_samples)
        dropped.add_metric(["buffer_error"], a.status.samples_dropped_on_error)
        yield dropped
        reloads = CounterMetricFamily(
            "edge_agent_config_reloads", "Config reloads, by result.", labels=["result"]
        )
        reloads.add_metric(["ok"], a.status.reloads_ok)
        reloads.add_metric(["failed"], a.status.reloads_failed)
        yield reloads

    def _devices(self) -> Iterator[Metric]:
        polls = CounterMetricFamily(
            "edge_agent_device_polls", "Polls made (good or not).", labels=["device"]
        )
        failed = CounterMetricFamily(
            "edge_agent_device_failed_polls",
            "Polls with at least one bad value.",
            labels=["device"],
        )
        skipped = CounterMetricFamily(
            "edge_agent_device_skipped_polls",
            "Poll slots skipped because a poll overran its interval.",
            labels=["device"],
        )
        connects = CounterMetricFamily(
            "edge_agent_device_connects", "Successful connects.", labels=["device"]
        )
        errors = CounterMetricFamily(
            "edge_agent_device_read_errors",
            "Bad values by reason (timeout, connection refused, a Modbus exception, ...).",
            labels=["device", "reason"],
        )
        duration = GaugeMetricFamily(
            "edge_agent_device_poll_duration_seconds",
            "Duration of the device's last poll.",
            labels=["device"],
        )
        up = GaugeMetricFamily(
            "edge_agent_device_up", "1 while the device is connected.", labels=["device"]
        )
        state = GaugeMetricFamily(
            "edge_agent_device_state",
            "1 for the device's current state (starting, up, down).",
            labels=["device", "state"],
        )
        for name, run in self.agent.devices.items():
            st = run.poller.status
            polls.add_metric([name], st.polls)
            failed.add_metric([name], st.failed_polls)
            skipped.add_metric([name], st.skipped_polls)
            connects.add_metric([name], st.connects)
            for reason, n in sorted(st.errors_by_reason.items()):
                errors.add_metric([name, reason], n)
            duration.add_metric([name], st.last_poll_duration_s)
            up.add_metric([name], 1 if st.state == "up" else 0)
            for s in DEVICE_STATES:
                state.add_metric([name, s], 1 if st.state == s else 0)
        yield from (polls, failed, skipped, connects, errors, duration, up, state)

    def _buffer(self) -> Iterator[Metric]:
        b = self.agent.buffer.stats()
        yield GaugeMetricFamily(
            "edge_agent_buffer_bytes", "Buffer size counted against max_bytes.", value=b.bytes
        )
        yield GaugeMetricFamily(
            "edge_agent_buffer_max_bytes", "The buffer's max_bytes.", value=b.max_bytes
        )
        yield GaugeMetricFamily(
            "edge_agent_buffer_records", "Records waiting to be sent.", value=b.records
        )
        yield GaugeMetricFamily(
            "edge_agent_buffer_samples", "Samples waiting to be sent.", value=b.samples
        )
        age = 0.0 if b.oldest_created is None else max(0.0, time.time() - b.oldest_created)
        yield GaugeMetricFamily(
            "edge_agent_buffer_oldest_age_seconds",
            "Age of the oldest unsent record (0 when the buffer is empty).",
            value=age,
        )
        writable, _ = buffer_writable(self.agent)
        yield GaugeMetricFamily(
            "edge_agent_buffer_writable", "1 while the buffer accepts data.", value=writable
        )

    def _mqtt(self) -> Iterator[Metric]:
        a = self.agent
        connected = a.current_publisher is not None and a.current_publisher.connected
        yield GaugeMetricFamily(
            "edge_agent_mqtt_connected", "1 while the broker session is up.", value=connected
        )
        f = a.forwarder.stats if a.forwarder is not None else None
        latency = f.last_latency_s if f is not None and f.last_latency_s is not None else 0.0
        yield GaugeMetricFamily(
            "edge_agent_publish_latency_seconds",
            "Time from buffer append to broker acknowledgement, of the newest delivered "
            "record (grows with a backlog).",
            value=latency,
        )
        fails = CounterMetricFamily(
            "edge_agent_publish_failures",
            "Messages not delivered (kept in the buffer and sent again), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(f.failures_by_reason.items()) if f else []:
            fails.add_metric([reason], n)
        yield fails
        p = publisher_stats(a)
        if p is None:
            return
        yield CounterMetricFamily(
            "edge_agent_mqtt_connects", "Broker sessions established.", value=p.connects
        )
        yield CounterMetricFamily(
            "edge_agent_mqtt_disconnects", "Broker sessions lost.", value=p.disconnects
        )
        yield CounterMetricFamily(
            "edge_agent_mqtt_messages_sent", "MQTT messages handed to the broker.", value=p.sent
        )
        yield CounterMetricFamily(
            "edge_agent_mqtt_messages_acked", "MQTT messages acknowledged.", value=p.acked
        )
        yield GaugeMetricFamily(
            "edge_agent_mqtt_inflight", "Messages sent and not yet acknowledged.", value=p.inflight
        )


def make_registry(agent: Agent) -> CollectorRegistry:
    """A registry of its own (not the process-global one), holding the agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of the registry."""
    return generate_latest(registry)
