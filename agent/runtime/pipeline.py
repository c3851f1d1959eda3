"""The agent: builds the pipeline from a valid Config and runs it until stopped.

Start order (outputs first, Telegraf's rule): buffer, HTTP endpoint, publisher,
forwarder, the buffer writer, then one poller per device. Every device's driver is built
before anything starts, so a device that cannot be built (a request plan that does not fit)
stops the start with a clear message. Stop order (inputs first): pollers stop, the writer
stores what they handed over, the forwarder gets `grace_s` to flush what is buffered, then
the publisher disconnects and the buffer closes. Nothing buffered is lost by stopping: what
did not go out stays on disk for the next start.

Every long-lived task runs under one `Supervisor` (agent.runtime.supervisor): a task that
fails is logged and restarted with backoff; one that keeps failing stops the agent, and
`run()` raises `TaskFailed` (the CLI logs ``agent.failed`` and exits 1). Heartbeat probes
watch the forwarder, the writer and each poller; a stalled one fails `/healthz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent import __version__
from agent.buffer import Buffer
from agent.buffer.common import open_buffer
from agent.command.guards import Refusal
from agent.command.service import CommandService
from agent.config import Config
from agent.deadletter_cli import open_store
from agent.derive.stage import DeviceDerive
from agent.derive.state import DeriveState, state_path
from agent.forwarder import Forwarder
from agent.normalize import Normalizer, SeqCounter
from agent.payload import PayloadEncoder
from agent.poller import DevicePoller, DeviceStatus
from agent.publish import Publisher
from agent.publish.cloud import message_limit, publish_rate
from agent.publish.sparkplug import SparkplugNode, sparkplug_node
from agent.publish.status import DeviceStatusSync, StatusMessages
from agent.runtime.latest import LatestSamples
from agent.runtime.reload import ReloadResult, plan_reload, read_config
from agent.runtime.snapshot import AgentSnapshot, take_snapshot
from agent.runtime.supervisor import (
    Heartbeats,
    Probe,
    Stall,
    SupervisionPolicy,
    Supervisor,
    TaskStalled,
)
from agent.runtime.writer import BufferWriter
from drivers.base import DeviceCommon, Driver, DriverContext, TagCommon

log = structlog.get_logger()

WRITER_TASK = "buffer-writer"
FORWARDER_TASK = "forwarder"
MQTT_TASK = "mqtt"
COMMANDS_TASK = "commands"
#: How often time windows that are over are closed when no reading closes them.
DERIVE_TICK_S = 1.0


def device_tags(device: DeviceCommon) -> list[TagCommon]:
    tags: list[TagCommon] = list(getattr(device, "tags", []))
    return tags


def make_driver(device: DeviceCommon, context: DriverContext | None = None) -> Driver:
    """The driver of a device, from its protocol's entry in drivers.registry (which
    imports the protocol library only when needed). `context` lends shared resources
    (links used by many devices); the runtime that passes one closes it at stop."""
    from drivers import registry

    return registry.create_driver(device, context if context is not None else DriverContext())


class DeviceBuildError(Exception):
    """One or more devices could not be built (their driver refused the config)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


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
    """One running device: its poller and the (supervised) task running it."""

    poller: DevicePoller
    task: asyncio.Task[None]
    derive: DeviceDerive | None = None


@dataclass
class _Built:
    """A device ready to start: everything that could fail has been done."""

    device: DeviceCommon
    poller: DevicePoller
    latest: LatestSamples
    derive: DeviceDerive | None = None


ConfigAdapter = Callable[[Config], Config]


def _task_name(device: str) -> str:
    return f"poll:{device}"


class Agent:
    """The running pipeline. `run()` returns when stopped; it never raises for device or
    broker trouble (those are states, logged and counted). It raises `TaskFailed` when a
    supervised task kept failing, and `DeviceBuildError` when a device cannot be built.

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
        health_interval_s: float = 1.0,
        supervision: SupervisionPolicy | None = None,
        simulate: bool | None = None,
    ) -> None:
        """simulate: how a reloaded file is checked — as `run` (False), as `run --simulate`
        (True), or without the mode's own checks (None, for library callers)."""
        self.config = config
        self.simulate = simulate
        self.buffer = buffer or open_buffer(config.buffer)
        self._publisher = publisher
        self.grace_s = grace_s
        self.status_interval_s = status_interval_s
        self.config_path = Path(config_path) if config_path is not None else None
        # In simulator mode the file's endpoints are replaced by the simulators'; a
        # reloaded file goes through the same replacement before it is compared.
        self._adapt = adapt_config or (lambda c: c)
        self.progress_interval_s = progress_interval_s
        self.health_interval_s = health_interval_s
        self.status = AgentStatus()
        self.devices: dict[str, DeviceRun] = {}
        # device → tag → the newest sample (agent.runtime.latest: one write per poll)
        self.latest: dict[str, LatestSamples] = {}
        self.rates = RateHistory(rate_interval_s)
        self.forwarder: Forwarder | None = None
        self.http_address: tuple[str, int] | None = None
        sup = config.supervision
        self.supervisor = Supervisor(
            supervision or SupervisionPolicy(max_failures=sup.max_failures, window_s=sup.window_s)
        )
        self.heartbeats = Heartbeats(on_stall=self._on_stall)
        self.stall_s = sup.stall_s
        self.derive_state = DeriveState(
            state_path(config.buffer.path) if config.buffer.kind == "sqlite" else None
        )
        self.writer = BufferWriter(
            self.buffer, self._stored, self._append_retrying, derive_state=self.derive_state
        )
        # What drivers share (one serial line or gateway connection for many units):
        # lent by this run, closed once every poller has stopped.
        self.driver_context = DriverContext(config.links)
        self._stop = asyncio.Event()
        self._running = False
        self._seq: SeqCounter | None = None
        self._reload_lock = asyncio.Lock()
        self._status_msgs: StatusMessages | None = None
        self.status_sync: DeviceStatusSync | None = None
        # layout sparkplug: the edge node (births, deaths, seq, bdSeq); see docs/sparkplug.md
        self.sparkplug: SparkplugNode | None = None
        # commands.enabled: writes from the platform (docs/commands.md)
        self.commands: CommandService | None = None

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

    def snapshot(self) -> AgentSnapshot:
        """The read model of the agent's state (what the HTTP endpoint shows)."""
        self.heartbeats.check()
        return take_snapshot(self)

    # ------------------------------------------------------------------ run

    def _make_publisher(self, config: Config) -> Publisher:
        from agent.publish.mqtt import MqttPublisher

        if self.sparkplug is not None:
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
            return mqtt_publisher
        assert self._status_msgs is not None
        return MqttPublisher(
            config.mqtt,
            config.mqtt.resolved_client_id(config.agent.id),
            will=self._status_msgs.will(),
            on_connect_messages=self._status_msgs.birth,
        )

    def _make_commands(self, config: Config, publisher: Publisher) -> CommandService:
        """The command service: audit log opened (and locked), signing key read, requests
        subscribed on the agent's session. Raises DeviceBuildError (nothing started)."""
        from agent.command.audit import AuditLocked, AuditLog, AuditUnavailable
        from agent.command.handler import CommandHandler
        from agent.command.service import CommandService
        from agent.command.signing import KeyProblem, read_key

        commands = config.commands
        audit = AuditLog(commands.audit)
        try:
            audit.open()
        except (AuditLocked, AuditUnavailable) as exc:
            raise DeviceBuildError([f"commands.audit.path: {exc}"]) from None
        key = None
        if commands.signing is not None:
            try:
                key = read_key(commands.signing.key_file)
            except KeyProblem as exc:
                audit.close()
                raise DeviceBuildError([f"commands.signing.key_file: {exc}"]) from None
        handler = CommandHandler(
            commands,
            lambda: {d.name: d for d in self.config.devices},
            lambda name: self.devices[name].poller if name in self.devices else None,
            audit,
            key=key,
            transport=transport_refusal(config, self.simulate),
        )
        restored = handler.restore()
        node = self.sparkplug
        service = CommandService(
            handler,
            publisher,
            agent_id=config.agent.id,
            alias_name=node.metric_name if node is not None else (lambda _d, _a: None),
        )
        subscribe = getattr(publisher, "subscribe_incoming", None)
        if callable(subscribe):
            subscribe(service.topic, service.on_request)
            if node is not None:
                subscribe(node.dcmd_filter, service.on_dcmd)
        else:  # a publisher without subscriptions (a test's fake): nothing arrives
            log.warning("command.not_subscribed", publisher=type(publisher).__name__)
        log.info(
            "command.enabled",
            topic=service.topic,
            signing=commands.signing is not None,
            audit=commands.audit.path,
            restored=restored,
        )
        return service

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
            layout=config.mqtt.layout,
        )
        if "layout" not in config.mqtt.model_fields_set:
            # The default changed from `device`: say so once, where an operator looks
            # after an upgrade (docs/layouts.md, upgrade notes).
            log.info(
                "mqtt.layout.default",
                layout=config.mqtt.layout,
                note="mqtt.layout is not set: publishing layout lean (edge-agent/batch/2); "
                "set mqtt.layout: device for the former payloads (edge-agent/batch/1)",
            )
        try:
            # Everything that can refuse the config is built before anything runs.
            built = self._build_devices([d for d in config.devices if d.enabled])
        except DeviceBuildError:
            await self.driver_context.aclose()
            await self.buffer.close()
            raise
        buffer = self.buffer
        self.sparkplug = sparkplug_node(
            config.agent,
            config.mqtt,
            config.buffer.path if config.buffer.kind == "sqlite" else None,
            # Births carry every metric's current value: the newest sample per tag.
            latest=lambda device: self.latest.get(device, {}),
            epoch=lambda: buffer.epoch,
        )
        if self.sparkplug is None:
            self._status_msgs = _status_messages(config, self.status.started)
        if self._publisher is None:
            self._publisher = self._make_publisher(config)
        publisher = self.publisher
        if config.commands.enabled:
            try:
                self.commands = self._make_commands(config, publisher)
            except DeviceBuildError:
                await self.driver_context.aclose()
                await self.buffer.close()
                raise
        if self._status_msgs is not None:
            self.status_sync = DeviceStatusSync(self._status_msgs, publisher)
        forwarder = self.forwarder = Forwarder(
            self.buffer,
            publisher,
            PayloadEncoder(
                config.agent, config.mqtt, sparkplug=self.sparkplug, epoch=self.buffer.epoch
            ),
            dead_letters=open_store(config),
            max_refusals=config.mqtt.max_refusals,
            max_message_bytes=config.mqtt.max_message_bytes,
            # mqtt.profile's limit (agent.publish.cloud.message_limit) when none is set:
            # agent.publish.limits.effective_max_message_bytes combines them.
            platform_message_bytes=message_limit(config.mqtt.profile),
            # Paced publishes (AWS IoT Core): fewer, larger messages instead of a queue
            # (the batch layouts; lean and compact say each poll's timestamp once).
            merge_records=config.mqtt.layout in ("lean", "compact", "device")
            and publish_rate(config.mqtt.profile, config.mqtt.max_publishes_per_s) is not None,
        )
        sup = self.supervisor
        try:
            async with AsyncExitStack() as stack:
                if config.http is not None:
                    from agent.http.server import HttpServer

                    server = HttpServer(self, config.http.host, config.http.port)
                    self.http_address = await stack.enter_async_context(server)
                    sup.start("http", server.serve)
                run_publisher = getattr(publisher, "run", None)
                if callable(run_publisher):
                    # The connection loop under supervision: if it raised, nothing would
                    # ever reconnect and delivery would stop with no task "stalled".
                    sup.start(MQTT_TASK, run_publisher)
                else:
                    await publisher.start()
                sup.start(FORWARDER_TASK, forwarder.run)
                self.heartbeats.add(self._forwarder_probe(forwarder, publisher))
                sup.start(WRITER_TASK, self.writer.run)
                self.heartbeats.add(
                    Probe(
                        WRITER_TASK,
                        busy=self.writer.busy,
                        progress=lambda: self.writer.trips,
                        deadline_s=self.stall_s,
                        what="polls are queued for the buffer and none was stored",
                        action="exit",
                    )
                )
                if self.sparkplug is not None:
                    node = self.sparkplug
                    sup.start("sparkplug", lambda: node.run(publisher))
                if self.status_sync is not None:
                    sup.start("device-status", self.status_sync.run)
                sup.start("health", lambda: self.heartbeats.run(self.health_interval_s))
                try:
                    await self._run_inputs(built, backlog)
                finally:
                    await self._shutdown(forwarder)
        finally:
            # The connection stays up for the offline status and the death certificate.
            await sup.stop_all(keep={MQTT_TASK})
            await self.driver_context.aclose()
            if self._status_msgs is not None and publisher.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await publisher.publish([self._status_msgs.offline()])
            if self.sparkplug is not None and publisher.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await publisher.publish([self.sparkplug.clean_death()])
            await publisher.close()
            await sup.stop(MQTT_TASK, forget=False)
            if self.commands is not None:
                self.commands.handler.audit.close()
            forwarder.dead_letters.close()
            await self.buffer.close()
            log.info(
                "agent.stopped",
                last_seq=seq.last,
                produced=self.status.samples_produced,
                delivered=forwarder.stats.samples_delivered,
            )
        if sup.failure is not None:
            raise sup.failure

    def _on_stall(self, stall: Stall, probe: Probe) -> None:
        """A stuck forwarder or poller is restarted (what it was doing is safe to do
        again: records are deleted only once acknowledged, a poll is simply repeated);
        a stuck writer may hold polls half-stored, so the agent exits and the service
        manager starts it afresh from what the buffer holds."""
        if probe.action == "restart" and probe.acted < 2:
            self.supervisor.kick(stall.task, f"stalled: {stall.reason}")
        elif probe.action in ("restart", "exit"):  # a restart did not help, or cannot
            self.supervisor.fail(stall.task, TaskStalled(f"{stall.reason} for {stall.for_s} s"))

    def _forwarder_probe(self, forwarder: Forwarder, publisher: Publisher) -> Probe:
        # 3 publish timeouts: a round whose messages all time out is not yet a stall.
        deadline = max(self.stall_s, 3 * self.config.mqtt.publish_timeout_s)

        def busy() -> bool:
            return publisher.connected and self.buffer.stats().records > 0

        def progress() -> int:
            # A device held back by a refusal's backoff waits at most
            # device_backoff_max_s (30 s), well inside the deadline, before it is tried
            # again or set aside.
            st = forwarder.stats
            return st.records_sent + st.dead_lettered_records

        return Probe(
            FORWARDER_TASK,
            busy=busy,
            progress=progress,
            deadline_s=deadline,
            what="records are buffered and the broker is connected, but none was "
            "delivered or set aside",
            action="restart",
        )

    async def _shutdown(self, forwarder: Forwarder) -> None:
        """Inputs have stopped: store what the pollers handed over, let the forwarder
        flush for grace_s, drain what is left within the grace."""
        sup = self.supervisor
        writer_task = sup.task(WRITER_TASK)
        if writer_task is not None and not writer_task.done():
            try:
                # Storing what was handed over takes well under a second; a buffer
                # that hangs must not keep the process from exiting.
                async with asyncio.timeout(max(self.grace_s, 5.0)):
                    await self.writer.stop()
                    await sup.wait(WRITER_TASK)
            except TimeoutError:
                log.error("agent.stopping.writer_stuck", queued=self.writer.queue.qsize())
        await sup.stop(WRITER_TASK, forget=False)
        stop_started = time.monotonic()
        forwarder.request_stop()
        await sup.wait(FORWARDER_TASK, self.grace_s)
        await sup.stop(FORWARDER_TASK, forget=False)
        for name in ("sparkplug", "device-status"):
            await sup.stop(name, forget=False)
        if sup.failure is not None and sup.failure.task == FORWARDER_TASK:
            return  # a forwarder that keeps failing would fail its drain too
        grace_left = max(0.0, self.grace_s - (time.monotonic() - stop_started))
        try:
            left = await forwarder.drain(grace_left)
        except Exception as exc:
            log.error("agent.stopping.drain_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if left:
            log.info("agent.stopping.buffer_kept", records=left)

    async def _run_inputs(self, built: list[_Built], backlog: int) -> None:
        sup = self.supervisor
        self._running = True
        for item in built:
            self._start_built(item)
        helpers = ["status", "rates", "derive-clock"]
        sup.start("derive-clock", self._derive_clock)
        sup.start("status", self._report)
        sup.start("rates", lambda: self.rates.run(self))
        if self.commands is not None:
            service = self.commands
            helpers.append(COMMANDS_TASK)
            sup.start(COMMANDS_TASK, service.run)
            # Every request is bounded by commands.timeout_s; a result publish by the
            # broker's publish_timeout_s.
            self.heartbeats.add(
                Probe(
                    COMMANDS_TASK,
                    busy=lambda: service.pending > 0,
                    progress=lambda: service.finished,
                    deadline_s=2 * self.config.commands.timeout_s
                    + 2 * self.config.mqtt.publish_timeout_s
                    + 5,
                    what="write requests are pending and none finished",
                    action="report",
                )
            )
        if backlog:
            helpers.append("drain-progress")
            sup.start("drain-progress", self._drain_progress)
        self.status.ready = True
        log.info("agent.started", devices=list(self.devices))
        stop = asyncio.ensure_future(self._stop.wait())
        failed = asyncio.ensure_future(sup.wait_failed())
        try:
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, failed):
                t.cancel()
            self.status.ready = False
            self._running = False
            log.info(
                "agent.stopping",
                skipped_polls=sum(p.status.skipped_polls for p in self.pollers),
                reason="task failed" if sup.failure is not None else "stop requested",
            )
            for name in [*(_task_name(n) for n in self.devices), *helpers]:
                await sup.stop(name, forget=False)

    def _build_devices(self, devices: list[DeviceCommon]) -> list[_Built]:
        """Build every device's driver and poller; raises DeviceBuildError naming every
        device that could not be built (and builds nothing then)."""
        assert self._seq is not None
        built: list[_Built] = []
        problems: list[str] = []
        for device in devices:
            try:
                built.append(self._build_device(device, self._seq))
            except Exception as exc:
                problems.append(f"device {device.name!r}: {type(exc).__name__}: {exc}")
        if problems:
            raise DeviceBuildError(problems)
        return built

    def _build_device(self, device: DeviceCommon, seq: SeqCounter) -> _Built:
        tags = device_tags(device)
        groups: dict[str, list[str]] = {}
        for tag in tags:
            groups.setdefault(tag.group, []).append(tag.name)
        normalizer = Normalizer(device.name, tags)
        driver = make_driver(device, self.driver_context)
        derive = (
            DeviceDerive(device, tags, self.derive_state)
            if DeviceDerive.wanted(device, tags)
            else None
        )
        sink, latest = self.writer.sink(device.name, normalizer, seq, derive)
        poller = DevicePoller(
            device,
            str(getattr(device, "protocol", "?")),
            driver,
            groups,
            sink,
            subscribe_groups=device.subscribe_groups(),
            on_state_change=self._device_state_changed,
        )
        if derive is not None:
            derive.set_reader(poller.read_soon)
        return _Built(device, poller, latest, derive)

    def _start_built(self, item: _Built) -> None:
        name = item.device.name
        poller = item.poller
        self.latest[name] = item.latest
        task = self.supervisor.start(_task_name(name), poller.run)
        self.devices[name] = DeviceRun(poller, task, item.derive)
        self.heartbeats.add(
            Probe(
                _task_name(name),
                busy=lambda: True,
                progress=lambda: poller.status.cycles,
                deadline_s=poller.stall_deadline_s,
                what="no poll finished",
                action="restart",
            )
        )

    def _device_state_changed(self, status: DeviceStatus) -> None:
        """Publish the retained device status (also re-sent after every connect)."""
        if self.sparkplug is not None and status.state in ("up", "down"):
            self.sparkplug.device_state(status.name, status.state)
        if self._status_msgs is None or status.state == "starting":
            return
        msg = self._status_msgs.device(status.name, status.state, status.reason, status.since)
        if self.status_sync is not None:
            self.status_sync.send(msg)

    async def _stop_device(self, name: str) -> None:
        run = self.devices.pop(name)
        self.writer.forget(name, run.derive)
        self.heartbeats.remove(_task_name(name))
        await self.supervisor.stop(_task_name(name))  # the poller closes its driver
        self.latest.pop(name, None)

    def _append_retrying(self, error: Exception | None) -> None:
        """The writer tries an append again (error) or it worked again (None)."""
        self.status.buffer_error = None if error is None else (str(error) or type(error).__name__)

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
        An invalid file, a change outside `devices`, or a device that cannot be built
        changes nothing."""
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
        if not self._running or self._stop.is_set() or self._seq is None:
            return ReloadResult(ok=False, problems=["the agent is not running"])
        if new is None:
            loaded = await read_config(self.config_path, self.simulate)
            if isinstance(loaded, ReloadResult):
                return loaded
            new = loaded
        new = self._adapt(new)
        result = plan_reload(self.config, new, set(self.devices))
        if not result.ok:
            return result
        wanted = {d.name: d for d in new.devices if d.enabled}
        try:
            built = self._build_devices([wanted[n] for n in [*result.restarted, *result.started]])
        except DeviceBuildError as exc:
            return ReloadResult(ok=False, problems=exc.problems)
        # Everything is built: from here on nothing can refuse the new config.
        for name in [*result.stopped, *result.restarted]:
            await self._stop_device(name)
        self.config = new
        for item in built:
            self._start_built(item)
        # Keep the config's order (the status page and metrics list devices that way).
        self.devices = {n: self.devices[n] for n in wanted if n in self.devices}
        if self._status_msgs is not None:
            from agent.config import config_hash

            self._status_msgs.set_config_hash(config_hash(new.model_dump_json()))
            if self.status_sync is not None:
                for name in result.stopped:
                    self.status_sync.send(self._status_msgs.removed(name))
                self.status_sync.send(self._status_msgs.online())
        return result

    # ------------------------------------------------------------------ progress

    async def _derive_clock(self) -> None:
        """Once a second, the writer closes the time windows that are over (agent.derive)."""
        while True:
            await asyncio.sleep(DERIVE_TICK_S)
            await self.writer.tick()

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
                buffer=b.health,
                tasks_stalled=[s.task for s in self.heartbeats.stalled],
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


def transport_refusal(config: Config, simulate: bool | None) -> Refusal | None:
    """Why commands arriving on the agent's broker session are not trusted, or None: the
    session must be TLS and authenticated (a user name or a client certificate), except in
    simulator mode. `validate` refuses such a config first; this is the run-time guard."""
    mqtt = config.mqtt
    if simulate is True:
        return None
    if mqtt.tls is None:
        return Refusal(
            "insecure_session",
            "the agent's broker session is not TLS; commands are accepted over plaintext "
            "only in simulator mode",
        )
    if mqtt.username is None and mqtt.tls.cert_file is None:
        return Refusal("insecure_session", "the agent's broker session is not authenticated")
    return None


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
