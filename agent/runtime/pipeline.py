"""The supervisor: builds the pipeline from a valid Config and runs it until a signal.

Start order (outputs first, Telegraf's rule): buffer, publisher, forwarder, the buffer
writer, then the simulators (simulator mode) and one poller per device. Stop order
(inputs first): pollers stop, the writer stores what they handed over, the forwarder
gets `grace_s` to flush what is buffered, then the publisher disconnects and the buffer
closes.

Pollers do not wait for the buffer: a poll's readings (and its ts_agent) go to a bounded
queue; one writer task normalises them, taking their seqs, and stores them, several polls
per trip to the buffer's thread. Seqs are taken in the order the buffer gets them, so a
batch is never refused for an out-of-order seq, whatever order waiting pollers resume
in. A full queue makes the pollers wait (backpressure) rather than drop anything. Nothing buffered
is lost by stopping: what did not go out stays on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent import __version__
from agent.buffer import Buffer
from agent.buffer.common import open_buffer
from agent.config import Config, ConfigError, load_config
from agent.forwarder import Forwarder
from agent.normalize import Normalizer, Readings, SeqCounter
from agent.payload import PayloadEncoder
from agent.poller import DevicePoller, DeviceStatus
from agent.publish import Publisher
from agent.publish.deadletter import DeadLetters
from agent.publish.sparkplug import SparkplugNode, sparkplug_node
from agent.publish.status import StatusMessages
from agent.schema import WireSample
from drivers.base import DeviceCommon, Driver, TagCommon

log = structlog.get_logger()

#: Polls handed over to the buffer writer but not stored yet (backpressure beyond).
WRITE_QUEUE_MAX = 64
#: At most this many polls go to the buffer's thread in one trip.
WRITE_BATCH_MAX = 32


@dataclass(slots=True)
class _DeviceSink:
    """What the writer needs to turn one device's readings into stored samples."""

    device: str
    normalizer: Normalizer
    seq: SeqCounter
    latest: dict[str, WireSample]


_Write = tuple[_DeviceSink, Readings, datetime]


class _BatchAppender(Protocol):
    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[WireSample]]]
    ) -> list[Exception | None]: ...


def device_tags(device: DeviceCommon) -> list[TagCommon]:
    tags: list[TagCommon] = list(getattr(device, "tags", []))
    return tags


def make_driver(device: DeviceCommon) -> Driver:
    """The driver of a device, importing its protocol library only when needed."""
    protocol = getattr(device, "protocol", None)
    if protocol == "modbus":
        from drivers.modbus.config import ModbusDevice
        from drivers.modbus.driver import ModbusDriver

        assert isinstance(device, ModbusDevice)
        return ModbusDriver(device)
    if protocol == "opcua":
        from drivers.opcua.config import OpcUaDevice
        from drivers.opcua.driver import OpcUaDriver

        assert isinstance(device, OpcUaDevice)
        return OpcUaDriver(device)
    raise ValueError(f"no driver for protocol {protocol!r}")


@dataclass
class AgentStatus:
    """Agent-wide counters and state (the per-device ones are in each DeviceStatus)."""

    started: float = field(default_factory=time.time)
    samples_produced: int = 0
    samples_dropped_on_error: int = 0
    ready: bool = False  # inputs running (set after start, cleared when stopping)
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload: float | None = None
    last_reload_error: list[str] = field(default_factory=list)
    buffer_error: str | None = None  # the last append failure, None once one succeeds


@dataclass
class DeviceRun:
    """One running device: its poller and the task running it."""

    poller: DevicePoller
    task: asyncio.Task[None]


@dataclass
class ReloadResult:
    """What a reload did. `ok` False means nothing changed; `problems` says why."""

    ok: bool
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "started": self.started,
            "stopped": self.stopped,
            "restarted": self.restarted,
            "unchanged": self.unchanged,
            "problems": self.problems,
        }


# Sections a reload cannot change on the fly: they shape the buffer, the broker session,
# the topics, the log setup and the listening socket. A reload that changes one of them
# is refused as a whole, so the running config is always one whole version of the file.
RESTART_SECTIONS = ("agent", "buffer", "mqtt", "logging", "http")

ConfigAdapter = Callable[[Config], Config]


class Agent:
    """The running pipeline. `run()` returns when stopped; it never raises for device or
    broker trouble (those are states, logged and counted).

    Devices are held per name (`devices`), each with its poller and task, so a reload
    stops and starts only the devices whose config changed; the buffer, the publisher
    and the forwarder are untouched by a reload.
    """

    def __init__(
        self,
        config: Config,
        *,
        publisher: Publisher | None = None,
        buffer: Buffer | None = None,
        grace_s: float = 10.0,
        status_interval_s: float = 60.0,
        config_path: str | Path | None = None,
        adapt_config: ConfigAdapter | None = None,
        progress_interval_s: float = 10.0,
        rate_interval_s: float = 5.0,
    ) -> None:
        self.config = config
        self.buffer = buffer or open_buffer(config.buffer)
        self._publisher = publisher
        self.grace_s = grace_s
        self.status_interval_s = status_interval_s
        self.config_path = Path(config_path) if config_path is not None else None
        # In simulator mode the file's endpoints are replaced by the simulators'; a
        # reloaded file goes through the same replacement before it is compared.
        self._adapt = adapt_config or (lambda c: c)
        self.progress_interval_s = progress_interval_s
        self.status = AgentStatus()
        self.devices: dict[str, DeviceRun] = {}
        # device → tag → the newest sample (the wire dict itself: one dict write per sample)
        self.latest: dict[str, dict[str, WireSample]] = {}
        self.rates = RateHistory(rate_interval_s)
        self.forwarder: Forwarder | None = None
        self.http_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._seq: SeqCounter | None = None
        self._reload_lock = asyncio.Lock()
        self._status_msgs: StatusMessages | None = None
        # layout sparkplug: the edge node (births, deaths, seq, bdSeq); see docs/sparkplug.md
        self.sparkplug: SparkplugNode | None = None
        self._status_tasks: set[asyncio.Task[Any]] = set()
        # Polls waiting for the writer; None tells the writer to stop (after the rest).
        self._writes: asyncio.Queue[_Write | None] = asyncio.Queue(WRITE_QUEUE_MAX)

    def stop(self) -> None:
        self._stop.set()

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None
        return self._publisher

    @property
    def current_publisher(self) -> Publisher | None:
        """The publisher, or None before run() made one."""
        return self._publisher

    @property
    def pollers(self) -> list[DevicePoller]:
        """The running pollers, in config order."""
        return [run.poller for run in self.devices.values()]

    async def run(self) -> None:
        config = self.config
        await self.buffer.open()
        seq = self._seq = SeqCounter(self.buffer.last_seq())
        backlog = self.buffer.stats().records
        log.info(
            "agent.starting",
            version=__version__,
            agent=config.agent.id,
            devices=len(config.devices),
            buffered_records=backlog,
            last_seq=seq.last,
        )
        self.sparkplug = sparkplug_node(
            config.agent,
            config.mqtt,
            config.buffer.path if config.buffer.kind == "sqlite" else None,
        )
        if self._publisher is None and self.sparkplug is not None:
            from agent.publish.mqtt import MqttPublisher

            # Sparkplug replaces the JSON status topics: its will is the NDEATH.
            node = self.sparkplug
            mqtt_publisher = MqttPublisher(
                config.mqtt,
                config.mqtt.resolved_client_id(config.agent.id),
                will_factory=node.next_will,
                on_connect_messages=node.on_connect,
                prepare=node.stamp,
            )
            mqtt_publisher.subscribe(node.ncmd_topic, node.on_command)
            self._publisher = mqtt_publisher
        if self._publisher is None:
            from agent.publish.mqtt import MqttPublisher

            self._status_msgs = _status_messages(config, self.status.started)
            self._publisher = MqttPublisher(
                config.mqtt,
                config.mqtt.resolved_client_id(config.agent.id),
                will=self._status_msgs.will(),
                on_connect_messages=self._status_msgs.birth,
            )
        publisher = self.publisher
        forwarder = self.forwarder = Forwarder(
            self.buffer,
            publisher,
            PayloadEncoder(config.agent, config.mqtt, sparkplug=self.sparkplug),
            dead_letters=_dead_letters(config),
            max_refusals=config.mqtt.max_refusals,
        )
        try:
            async with AsyncExitStack() as stack:
                if config.http is not None:
                    from agent.http.server import HttpServer

                    server = HttpServer(self, config.http.host, config.http.port)
                    self.http_address = await stack.enter_async_context(server)
                await publisher.start()
                forward_task = asyncio.create_task(forwarder.run(), name="forwarder")
                writer_task = asyncio.create_task(self._writer(), name="buffer-writer")
                births_task = (
                    asyncio.create_task(self.sparkplug.run(publisher), name="sparkplug")
                    if self.sparkplug is not None
                    else None
                )
                try:
                    await self._run_inputs(seq, backlog)
                finally:
                    # The pollers have stopped: store what they handed over first.
                    await self._writes.put(None)
                    await asyncio.wait({writer_task})
                    stop_started = time.monotonic()
                    forwarder.request_stop()
                    await asyncio.wait({forward_task}, timeout=self.grace_s)
                    forward_task.cancel()
                    if births_task is not None:
                        births_task.cancel()
                    await asyncio.wait({forward_task, *([births_task] if births_task else [])})
                    grace_left = max(0.0, self.grace_s - (time.monotonic() - stop_started))
                    left = await forwarder.drain(grace_left)
                    if left:
                        log.info("agent.stopping.buffer_kept", records=left)
        finally:
            if self._status_msgs is not None and publisher.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await publisher.publish([self._status_msgs.offline()])
            if self.sparkplug is not None and publisher.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await publisher.publish([self.sparkplug.clean_death()])
            await publisher.close()
            await self.buffer.close()
            log.info(
                "agent.stopped",
                last_seq=seq.last,
                produced=self.status.samples_produced,
                delivered=forwarder.stats.samples_delivered,
            )

    async def _run_inputs(self, seq: SeqCounter, backlog: int) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for device in self.config.devices:
                if device.enabled:
                    self._start_device(device)
            helpers = [
                tg.create_task(self._report(), name="status"),
                tg.create_task(self.rates.run(self), name="rates"),
            ]
            if backlog:
                helpers.append(tg.create_task(self._drain_progress(), name="drain-progress"))
            self.status.ready = True
            log.info("agent.started", devices=list(self.devices))
            try:
                await self._stop.wait()
            finally:
                self.status.ready = False
                self._tg = None
                log.info(
                    "agent.stopping",
                    skipped_polls=sum(p.status.skipped_polls for p in self.pollers),
                )
                for t in [*(r.task for r in self.devices.values()), *helpers]:
                    t.cancel()

    def _start_device(self, device: DeviceCommon) -> None:
        assert self._tg is not None
        assert self._seq is not None
        tags = device_tags(device)
        groups: dict[str, list[str]] = {}
        for tag in tags:
            groups.setdefault(tag.group, []).append(tag.name)
        normalizer = Normalizer(device.name, tags)
        poller = DevicePoller(
            device,
            str(getattr(device, "protocol", "?")),
            make_driver(device),
            groups,
            self._sink(device.name, normalizer, self._seq),
            subscribe_groups=device.subscribe_groups(),
            on_state_change=self._device_state_changed,
        )
        task = self._tg.create_task(poller.run(), name=f"poll:{device.name}")
        self.devices[device.name] = DeviceRun(poller, task)

    def _device_state_changed(self, status: DeviceStatus) -> None:
        """Publish the retained device status (also re-sent with every MQTT birth)."""
        if self.sparkplug is not None and status.state in ("up", "down"):
            self.sparkplug.device_state(status.name, status.state)
        if self._status_msgs is None or status.state == "starting":
            return
        msg = self._status_msgs.device(status.name, status.state, status.reason, status.since)
        if self.publisher.connected:
            task = asyncio.create_task(self.publisher.publish([msg]), name="device-status")
            self._status_tasks.add(task)
            task.add_done_callback(self._status_tasks.discard)

    async def _stop_device(self, name: str) -> None:
        run = self.devices.pop(name)
        run.task.cancel()
        await asyncio.wait({run.task})  # the poller closes its driver on the way out
        self.latest.pop(name, None)

    def _sink(self, device: str, normalizer: Normalizer, seq: SeqCounter) -> Any:
        target = _DeviceSink(device, normalizer, seq, {})
        self.latest[device] = target.latest
        writes = self._writes

        async def sink(readings: Readings) -> None:
            if readings:
                await writes.put((target, readings, datetime.now(UTC)))

        return sink

    async def _writer(self) -> None:
        """Normalise and store the polls handed over by the sinks, in order, until told
        to stop (None), then return once everything handed over before is stored."""
        writes = self._writes
        buffer = self.buffer
        many: _BatchAppender | None = (
            buffer if callable(getattr(buffer, "append_many", None)) else None  # type: ignore[assignment]
        )
        stopping = False
        while not stopping:
            item = await writes.get()
            batch: list[tuple[str, list[WireSample]]] = []
            while item is not None:
                target, readings, ts_agent = item
                try:
                    samples = target.normalizer.samples(readings, ts_agent, target.seq)
                except Exception as exc:  # a bug must not stop the writer (and the pollers)
                    log.exception("normalize.failed", device=target.device)
                    self._stored(target.device, len(readings), exc)
                    samples = []
                latest = target.latest
                for sample in samples:
                    latest[sample["tag"]] = sample
                if samples:
                    batch.append((target.device, samples))
                if len(batch) >= WRITE_BATCH_MAX or writes.empty():
                    break
                item = writes.get_nowait()
            stopping = item is None
            if not batch:
                continue
            if many is not None:
                try:
                    errors: list[Exception | None] = await many.append_many(batch)
                except Exception as exc:
                    errors = [exc] * len(batch)
            else:
                errors = []
                for dev, samples in batch:
                    try:
                        await buffer.append(dev, samples)
                        errors.append(None)
                    except Exception as exc:
                        errors.append(exc)
            for (dev, samples), error in zip(batch, errors, strict=True):
                self._stored(dev, len(samples), error)

    def _stored(self, device: str, samples: int, error: Exception | None) -> None:
        status = self.status
        if error is None:
            status.samples_produced += samples
            status.buffer_error = None
            return
        status.samples_dropped_on_error += samples
        status.buffer_error = str(error) or type(error).__name__
        log.error("buffer.append.failed", device=device, error=str(error), samples=samples)

    # ------------------------------------------------------------------ reload

    async def reload(self, new: Config | None = None) -> ReloadResult:
        """Apply a new config (default: re-read `config_path`). Only devices whose
        config changed are restarted; the buffer and the broker session are untouched.
        An invalid file, or a change outside `devices`, changes nothing."""
        async with self._reload_lock:
            result = await self._reload(new)
        self.status.last_reload = time.time()
        if result.ok:
            self.status.reloads_ok += 1
            self.status.last_reload_error = []
            log.info(
                "config.reloaded",
                started=result.started,
                stopped=result.stopped,
                restarted=result.restarted,
                unchanged=len(result.unchanged),
            )
        else:
            self.status.reloads_failed += 1
            self.status.last_reload_error = result.problems
            log.error(
                "config.reload.failed",
                problems=result.problems,
                note="the running config stays in effect",
            )
        return result

    async def _reload(self, new: Config | None) -> ReloadResult:
        if self._tg is None or self._stop.is_set():
            return ReloadResult(ok=False, problems=["the agent is not running"])
        if new is None:
            if self.config_path is None:
                return ReloadResult(ok=False, problems=["no config file to reload from"])
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                return ReloadResult(ok=False, problems=exc.problems)
        new = self._adapt(new)
        old = self.config
        sections = [s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)]
        if sections:
            return ReloadResult(
                ok=False,
                problems=[
                    f"section {s!r} changed: this needs a restart of the agent "
                    "(a reload only applies changes to devices)"
                    for s in sections
                ],
            )
        wanted = {d.name: d for d in new.devices if d.enabled}
        running = {d.name: d for d in old.devices if d.name in self.devices}
        result = ReloadResult(ok=True)
        for name, device in running.items():
            if name not in wanted:
                result.stopped.append(name)
            elif wanted[name] != device:
                result.restarted.append(name)
            else:
                result.unchanged.append(name)
        result.started = [n for n in wanted if n not in running]
        for name in [*result.stopped, *result.restarted]:
            await self._stop_device(name)
        self.config = new
        for name in [*result.restarted, *result.started]:
            self._start_device(wanted[name])
        # Keep the config's order (the status page and metrics list devices that way).
        self.devices = {n: self.devices[n] for n in wanted if n in self.devices}
        if self._status_msgs is not None:
            from agent.config import config_hash

            self._status_msgs.set_config_hash(config_hash(new.model_dump_json()))
            publisher = self.current_publisher
            if publisher is not None and publisher.connected:
                await publisher.publish([self._status_msgs.online()])
        return result

    # ------------------------------------------------------------------ progress

    async def _report(self) -> None:
        """A periodic status line, so an operator sees progress without metrics."""
        while True:
            await asyncio.sleep(self.status_interval_s)
            b = self.buffer.stats()
            f = self.forwarder.stats if self.forwarder else None
            log.info(
                "agent.status",
                produced=self.status.samples_produced,
                delivered=f.samples_delivered if f else 0,
                buffered_records=b.records,
                buffered_samples=b.samples,
                dropped=b.dropped_samples + self.status.samples_dropped_on_error,
                skipped_polls=sum(p.status.skipped_polls for p in self.pollers),
                mqtt="connected" if self.publisher.connected else "disconnected",
                devices_down=[p.device.name for p in self.pollers if p.status.state == "down"],
            )

    async def _drain_progress(self) -> None:
        """Started with a backlog: log how the drain goes (left, rate, estimated time)
        until the buffer is down to what one forwarder round takes."""
        assert self.forwarder is not None
        forwarder = self.forwarder
        done_below = forwarder.max_records
        start = time.monotonic()
        first = self.buffer.stats()
        log.info("buffer.drain.started", records=first.records, samples=first.samples)
        last_t, last_sent = start, forwarder.stats.records_sent
        while True:
            await asyncio.sleep(self.progress_interval_s)
            b = self.buffer.stats()
            now, sent = time.monotonic(), forwarder.stats.records_sent
            if b.records <= done_below:
                log.info(
                    "buffer.drain.done",
                    records_sent=sent,
                    took_s=round(now - start, 1),
                )
                return
            rate = (sent - last_sent) / (now - last_t) if now > last_t else 0.0
            eta = drain_eta(b.records, rate)
            log.info(
                "buffer.drain.progress",
                records_left=b.records,
                samples_left=b.samples,
                records_per_s=round(rate, 1),
                eta_s=None if eta is None else round(eta),
                mqtt="connected" if self.publisher.connected else "disconnected",
            )
            last_t, last_sent = now, sent


def drain_eta(records_left: int, sent_per_s: float) -> float | None:
    """Seconds until `records_left` are sent at `sent_per_s` (None when nothing moves)."""
    if sent_per_s <= 0:
        return None
    return records_left / sent_per_s


class RateHistory:
    """Samples produced and delivered, sampled every `interval_s` for the last
    `points` intervals: the status page's message-rate chart."""

    def __init__(self, interval_s: float = 5.0, points: int = 72) -> None:
        self.interval_s = interval_s
        self.points: deque[tuple[float, int, int, int]] = deque(maxlen=points)

    def sample(self, agent: Agent) -> None:
        f = agent.forwarder.stats if agent.forwarder else None
        self.points.append(
            (
                time.time(),
                agent.status.samples_produced,
                f.samples_delivered if f else 0,
                f.records_sent if f else 0,
            )
        )

    async def run(self, agent: Agent) -> None:
        while True:
            self.sample(agent)
            await asyncio.sleep(self.interval_s)

    def rates(self) -> list[dict[str, float]]:
        """Per interval: end time, samples produced/s, samples delivered/s, messages/s
        (records delivered per second; one record is one poll's batch)."""
        out = []
        for (t0, p0, d0, r0), (t1, p1, d1, r1) in itertools.pairwise(self.points):
            dt = t1 - t0
            if dt <= 0:
                continue
            out.append(
                {
                    "t": round(t1, 3),
                    "produced_per_s": round((p1 - p0) / dt, 2),
                    "delivered_per_s": round((d1 - d0) / dt, 2),
                    "records_per_s": round((r1 - r0) / dt, 2),
                }
            )
        return out


def _status_messages(config: Config, started: float) -> StatusMessages:
    from agent.config import config_hash

    return StatusMessages(
        config.agent,
        config.mqtt,
        version=__version__,
        config_hash=config_hash(config.model_dump_json()),
        started=started,
    )


def _dead_letters(config: Config) -> DeadLetters:
    """Next to the buffer file; in memory for a memory buffer."""
    if config.buffer.kind == "sqlite":
        return DeadLetters(f"{config.buffer.path}.deadletter.sqlite")
    return DeadLetters(None)


async def run_until_signal(agent: Agent) -> None:
    """Run the agent; SIGINT/SIGTERM stop it (a second signal stops at once); SIGHUP
    reloads the config file (see `Agent.reload`)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = 0
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("agent.signal", signal=signal.Signals(signum).name)
            agent.stop()
        elif main is not None:
            main.cancel()

    def on_hangup() -> None:
        log.info("agent.signal", signal="SIGHUP", action="reload")
        task = asyncio.create_task(agent.reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    hangup = getattr(signal, "SIGHUP", None)  # none on Windows: reload over HTTP there
    if hangup is not None:
        loop.add_signal_handler(hangup, on_hangup)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, *([hangup] if hangup else [])):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
