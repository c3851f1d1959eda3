"""Prometheus metrics, read from the pipeline's own figures at scrape time.

A custom collector (no counters updated on the hot path): each scrape takes one
`AgentSnapshot` (agent.runtime.snapshot) and turns it into metric families. Every name
starts with `edge_agent_`; the list with meanings is in docs/operating.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.runtime.snapshot import AgentSnapshot, health, readiness

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEVICE_STATES = ("starting", "up", "down")


class AgentCollector(Collector):
    """Reads one snapshot of the agent on every collect()."""

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._agent(snap)
        yield from self._tasks(snap)
        yield from self._devices(snap)
        yield from self._buffer(snap)
        yield from self._mqtt(snap)
        yield from self._poison(snap)

    def _agent(self, a: AgentSnapshot) -> Iterator[Metric]:
        info = InfoMetricFamily("edge_agent", "The agent's identity.")
        info.add_metric([], {"version": __version__, "agent": a.agent_id})
        yield info
        yield GaugeMetricFamily(
            "edge_agent_start_time_seconds",
            "When the agent started (Unix time).",
            value=a.started,
        )
        yield GaugeMetricFamily(
            "edge_agent_ready", "1 while /readyz answers 200.", value=1 if readiness(a)[0] else 0
        )
        yield GaugeMetricFamily(
            "edge_agent_healthy", "1 while /healthz answers 200.", value=1 if health(a)[0] else 0
        )
        f = a.forwarder
        yield CounterMetricFamily(
            "edge_agent_samples_produced",
            "Samples read from devices and written to the buffer.",
            value=a.samples_produced,
        )
        yield CounterMetricFamily(
            "edge_agent_samples_published",
            "Samples delivered to the broker (acknowledged) and removed from the buffer.",
            value=f.samples_delivered,
        )
        yield CounterMetricFamily(
            "edge_agent_records_published",
            "Buffer records (one poll's batch each) delivered to the broker.",
            value=f.records_sent,
        )
        dropped = CounterMetricFamily(
            "edge_agent_samples_dropped",
            "Samples lost, by reason: the buffer's gap reasons (drop_oldest, drop_newest, "
            "too_large, max_age, memory_full, corrupt) and buffer_error (an append failed).",
            labels=["reason"],
        )
        for reason, count in sorted(a.buffer.dropped_by_reason.items()):
            dropped.add_metric([reason], count)
        dropped.add_metric(["buffer_error"], a.samples_dropped_on_error)
        yield dropped
        reloads = CounterMetricFamily(
            "edge_agent_config_reloads", "Config reloads, by result.", labels=["result"]
        )
        reloads.add_metric(["ok"], a.reloads_ok)
        reloads.add_metric(["failed"], a.reloads_failed)
        yield reloads

    def _tasks(self, a: AgentSnapshot) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "edge_agent_task_restarts",
            "Restarts of a supervised task after it failed.",
            labels=["task"],
        )
        failures = CounterMetricFamily(
            "edge_agent_task_failures",
            "Unexpected exceptions of a supervised task.",
            labels=["task"],
        )
        stalled = GaugeMetricFamily(
            "edge_agent_task_stalled",
            "1 while the task has work waiting and made no progress within its deadline.",
            labels=["task"],
        )
        for t in a.tasks:
            restarts.add_metric([t.name], t.restarts)
            failures.add_metric([t.name], t.failures)
            stalled.add_metric([t.name], 1 if t.stalled else 0)
        yield from (restarts, failures, stalled)

    def _devices(self, a: AgentSnapshot) -> Iterator[Metric]:
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
        derived = CounterMetricFamily(
            "edge_agent_device_derived",
            "What the derive stage did (docs/derive.md), by kind: held_back, repeats, "
            "cycles, cycles_missed, counter_resets, debounced, windows.",
            labels=["device", "kind"],
        )
        for st in a.devices:
            name = st.name
            for kind, n in st.derived:
                derived.add_metric([name, kind], n)
            polls.add_metric([name], st.polls)
            failed.add_metric([name], st.failed_polls)
            skipped.add_metric([name], st.skipped_polls)
            connects.add_metric([name], st.connects)
            for reason, n in st.errors_by_reason:
                errors.add_metric([name, reason], n)
            duration.add_metric([name], st.last_poll_duration_s)
            up.add_metric([name], 1 if st.state == "up" else 0)
            for s in DEVICE_STATES:
                state.add_metric([name, s], 1 if st.state == s else 0)
        yield from (polls, failed, skipped, connects, errors, duration, up, state, derived)

    def _poison(self, a: AgentSnapshot) -> Iterator[Metric]:
        p = a.forwarder.poison
        if p is None:
            return
        dead = CounterMetricFamily(
            "edge_agent_dead_lettered_records",
            "Records (or parts of records) set aside in the dead-letter store, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(p.dead_lettered_by_reason.items()):
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily(
            "edge_agent_split_records",
            "Records sent as several messages (too large for the broker).",
            value=p.split_records,
        )
        backoff = GaugeMetricFamily(
            "edge_agent_device_backoff",
            "1 while the device's records wait for a refusal's backoff.",
            labels=["device"],
        )
        for device in sorted(p.backing_off):
            backoff.add_metric([device], 1)
        yield backoff
        yield GaugeMetricFamily(
            "edge_agent_dead_letter_bytes", "Size of the dead-letter store.", value=p.store.bytes
        )

    def _buffer(self, a: AgentSnapshot) -> Iterator[Metric]:
        b = a.buffer
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
        yield GaugeMetricFamily(
            "edge_agent_buffer_lease_ok",
            "0 while the seq lease cannot be written durably (the disk fails).",
            value=1 if b.lease_ok else 0,
        )
        yield CounterMetricFamily(
            "edge_agent_buffer_damaged_files",
            "Damaged buffer files moved aside and salvaged since start.",
            value=b.damaged_files,
        )
        age = 0.0 if b.oldest_created is None else max(0.0, a.taken - b.oldest_created)
        yield GaugeMetricFamily(
            "edge_agent_buffer_oldest_age_seconds",
            "Age of the oldest unsent record (0 when the buffer is empty).",
            value=age,
        )
        yield GaugeMetricFamily(
            "edge_agent_buffer_writable",
            "1 while the buffer accepts data.",
            value=a.buffer_writable,
        )
        yield GaugeMetricFamily(
            "edge_agent_buffer_degraded",
            "1 while the buffer's disk fails and new records are held in memory.",
            value=b.degraded,
        )
        yield GaugeMetricFamily(
            "edge_agent_buffer_memory_records",
            "Records held in memory while the buffer is degraded.",
            value=b.memory_records,
        )

    def _mqtt(self, a: AgentSnapshot) -> Iterator[Metric]:
        m = a.mqtt
        yield GaugeMetricFamily(
            "edge_agent_mqtt_connected", "1 while the broker session is up.", value=m.connected
        )
        f = a.forwarder
        latency = f.last_latency_s if f.last_latency_s is not None else 0.0
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
        for reason, n in f.failures_by_reason:
            fails.add_metric([reason], n)
        yield fails
        if m.connects is None:
            return  # a publisher without stats (a test's)
        yield CounterMetricFamily(
            "edge_agent_mqtt_connects", "Broker sessions established.", value=m.connects
        )
        yield CounterMetricFamily(
            "edge_agent_mqtt_disconnects", "Broker sessions lost.", value=m.disconnects or 0
        )
        yield CounterMetricFamily(
            "edge_agent_mqtt_messages_sent",
            "MQTT messages handed to the broker.",
            value=m.sent or 0,
        )
        yield CounterMetricFamily(
            "edge_agent_mqtt_messages_acked", "MQTT messages acknowledged.", value=m.acked or 0
        )
        yield GaugeMetricFamily(
            "edge_agent_mqtt_inflight",
            "Messages sent and not yet acknowledged.",
            value=m.inflight or 0,
        )


def make_registry(snapshot: Callable[[], AgentSnapshot]) -> CollectorRegistry:
    """A registry of its own (not the process-global one), holding the agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of the registry."""
    return generate_latest(registry)
