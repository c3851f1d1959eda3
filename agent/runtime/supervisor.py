"""Task supervision and heartbeats: nothing the agent runs may stop silently.

Every long-lived task (pollers, the buffer writer, the forwarder, the Sparkplug node, the
HTTP server, the status, rate and drain reporters, the device-status publisher) runs under
one `Supervisor`:

- a task that raises an unexpected exception is logged once, with its traceback
  (``task.failed``, ``task=``), and started again after a backoff (exponential with jitter,
  `SupervisionPolicy.backoff_min_s` .. `backoff_max_s`);
- a task that fails `max_failures` times within `window_s` seconds is fatal: the
  supervisor records it (`failure`) and the agent stops and exits 1 with one line
  (``agent.failed``, ``task=``, ``error=``), so the service manager restarts the process;
- a task that returns is finished and is not restarted;
- cancellation is never caught: `CancelledError` is not an `Exception`, so cancelling a
  supervised task cancels the work it runs.

A task that is alive but makes no progress is caught by `Heartbeats`: each `Probe` says,
from public state only, whether the task has work waiting (`busy`) and a counter that moves
when it does some (`progress`). A task that is busy and whose counter has not moved for its
deadline is *stalled*; `/healthz` then fails and names it, and the probe's `action` says
what else happens: ``restart`` (the supervisor cancels the stuck run and starts the task
again, counted as a failure; if the task is still stalled one deadline later the agent
exits 1), ``exit`` (the agent stops and exits 1 at once: for a task whose work cannot be
safely abandoned half-way), or ``report`` (health only). A stalled agent never stays up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from agent.poller import Backoff

log = structlog.get_logger()

TaskPhase = Literal["running", "restarting", "done", "failed"]


@dataclass(frozen=True, slots=True)
class SupervisionPolicy:
    """When a failing task is restarted and when it brings the agent down."""

    max_failures: int = 5
    window_s: float = 60.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0


class TaskStalled(Exception):
    """A supervised task was busy and made no progress for its deadline."""


class TaskFailed(Exception):
    """A supervised task failed `max_failures` times within `window_s`."""

    def __init__(self, task: str, error: BaseException) -> None:
        self.task = task
        self.error = error
        self.error_text = f"{type(error).__name__}: {error}"
        super().__init__(f"task {task!r} kept failing: {self.error_text}")


@dataclass(slots=True)
class TaskState:
    """What the operator sees about one supervised task."""

    name: str
    phase: TaskPhase = "running"
    starts: int = 0
    failures: int = 0  # since the task was first started
    last_error: str | None = None
    last_failure: float | None = None  # epoch seconds

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)


class Supervisor:
    """Runs named tasks, restarts the ones that fail, and reports the one that keeps
    failing (`failure`, `wait_failed()`)."""

    def __init__(
        self,
        policy: SupervisionPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy or SupervisionPolicy()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}  # the current run of each task
        self._kicked: dict[str, str] = {}  # task → why its current run was cancelled
        self.states: dict[str, TaskState] = {}
        self.failure: TaskFailed | None = None
        self._failed = asyncio.Event()

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `factory()` as task `name`, again after each failure (see the module doc)."""
        running = self._tasks.get(name)
        if running is not None and not running.done():
            raise ValueError(f"task {name!r} is already running")
        state = self.states[name] = TaskState(name)
        task = asyncio.create_task(self._supervise(name, factory, state), name=name)
        self._tasks[name] = task
        return task

    def task(self, name: str) -> asyncio.Task[None] | None:
        return self._tasks.get(name)

    async def stop(self, name: str, *, forget: bool = True) -> None:
        """Cancel task `name` and wait until it has finished (its `finally` blocks ran).

        A library that swallows a cancellation (pymodbus does, while it connects) would
        keep the task running and the stop waiting for ever: the task is asked again every
        `STOP_RECANCEL_S` until it ends (logged once, `task.stop.repeated`)."""
        task = self._tasks.get(name)
        if task is not None:
            await _cancel_and_wait(name, task)
        if forget:
            self._tasks.pop(name, None)
            self.states.pop(name, None)

    async def wait(self, name: str, timeout_s: float | None = None) -> bool:
        """Wait until task `name` has finished (True) or `timeout_s` passed (False)."""
        task = self._tasks.get(name)
        if task is None:
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        return bool(done)

    def kick(self, name: str, reason: str) -> bool:
        """Cancel the current run of task `name` because it is stuck; the supervisor
        counts it as a failure (`TaskStalled`) and starts it again as after an exception.
        Returns False when the task is not running."""
        run = self._runs.get(name)
        if run is None or run.done():
            return False
        self._kicked[name] = reason
        run.cancel()
        return True

    def fail(self, name: str, error: BaseException) -> None:
        """Give up on the agent because of task `name` (it exits 1, naming it)."""
        state = self.states.get(name)
        if state is not None:
            state.phase = "failed"
            state.last_error = f"{type(error).__name__}: {error}"
        log.error("task.fatal", task=name, error=f"{type(error).__name__}: {error}")
        if self.failure is None:
            self.failure = TaskFailed(name, error)
            self._failed.set()

    async def stop_all(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Cancel every task but those in `keep`, and wait until they have finished."""
        tasks = {n: t for n, t in self._tasks.items() if not t.done() and n not in keep}
        if tasks:
            await asyncio.gather(*(_cancel_and_wait(n, t) for n, t in tasks.items()))

    async def wait_failed(self) -> TaskFailed:
        """Return the fatal failure once a task has failed for good."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    async def _supervise(
        self, name: str, factory: Callable[[], Awaitable[None]], state: TaskState
    ) -> None:
        policy = self.policy
        backoff = Backoff(policy.backoff_min_s, policy.backoff_max_s, self._rng)
        recent: deque[float] = deque()
        while True:
            state.phase = "running"
            state.starts += 1
            started = self._clock()
            run = asyncio.ensure_future(factory())
            self._runs[name] = run
            try:
                try:
                    await run
                except asyncio.CancelledError:
                    reason = self._kicked.pop(name, None)
                    if reason is None or not run.cancelled():
                        raise  # a stop: cancellation is never swallowed
                    # Only the stuck run was cancelled (kick): our own task goes on.
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                    raise TaskStalled(reason) from None
            except Exception as exc:
                now = self._clock()
                if now - started > policy.window_s:
                    backoff.reset()  # it ran well for a while: a fresh incident
                recent.append(now)
                while recent and now - recent[0] > policy.window_s:
                    recent.popleft()
                error = f"{type(exc).__name__}: {exc}"
                state.failures += 1
                state.last_error = error
                state.last_failure = time.time()
                fatal = len(recent) >= policy.max_failures
                log.error(
                    "task.failed",
                    task=name,
                    error=error,
                    failures_in_window=len(recent),
                    max_failures=policy.max_failures,
                    window_s=policy.window_s,
                    action="agent exits" if fatal else "restarting",
                    exc_info=exc,
                )
                if fatal:
                    state.phase = "failed"
                    if self.failure is None:
                        self.failure = TaskFailed(name, exc)
                        self._failed.set()
                    return
                state.phase = "restarting"
                await self._sleep(backoff.next())
                continue
            state.phase = "done"
            return


#: How long a stop waits for a cancelled task before it cancels it again.
STOP_RECANCEL_S = 1.0


async def _cancel_and_wait(name: str, task: asyncio.Task[None]) -> None:
    task.cancel()
    asked = 1
    while True:
        done, _ = await asyncio.wait({task}, timeout=STOP_RECANCEL_S)
        if done:
            return
        if asked == 1:
            log.warning(
                "task.stop.repeated",
                task=name,
                note="the task did not end when cancelled (a library swallowed the "
                "cancellation); asking again",
            )
        task.cancel()
        asked += 1


# ---------------------------------------------------------------------------- heartbeats


@dataclass(frozen=True, slots=True)
class Stall:
    """A task that has work waiting and has made no progress for longer than its deadline."""

    task: str
    reason: str
    for_s: float
    deadline_s: float


StallAction = Literal["report", "restart", "exit"]


@dataclass(slots=True)
class Probe:
    """Progress of one task seen from the outside.

    `busy()`: the task has work waiting (records buffered and the broker connected, polls
    queued, a poll due). `progress()`: a counter that moves whenever the task does some
    work. `what` says in words what is not happening, for the health body. `action`: what
    a stall does besides failing health (see the module docstring)."""

    task: str
    busy: Callable[[], bool]
    progress: Callable[[], int]
    deadline_s: float
    what: str
    action: StallAction = "report"
    _last: int | None = field(default=None, init=False)
    _since: float | None = field(default=None, init=False)
    _acted: float | None = field(default=None, init=False)
    #: How often the action fired in the current stall (0 once it progresses again).
    acted: int = field(default=0, init=False)

    def check(self, now: float) -> Stall | None:
        busy = self.busy()
        value = self.progress()
        if not busy or value != self._last or self._since is None:
            self._last = value
            self._since = now
            self._acted = None
            self.acted = 0
            return None
        idle = now - self._since
        if idle <= self.deadline_s:
            return None
        return Stall(self.task, self.what, round(idle, 1), self.deadline_s)

    def action_due(self, now: float) -> bool:
        """While stalled: the action is due at once, then once per deadline (a restart
        that did not help is tried again, and counted again)."""
        if self.action == "report":
            return False
        if self._acted is not None and now - self._acted < self.deadline_s:
            return False
        self._acted = now
        self.acted += 1
        return True


class Heartbeats:
    """The probes of every task; `check()` returns the stalled ones. Checked every
    second by a supervised task and on every `/healthz`."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_stall: Callable[[Stall, Probe], None] | None = None,
    ) -> None:
        """on_stall: called once when a task becomes stalled (e.g. to restart it)."""
        self._clock = clock
        self._on_stall = on_stall
        self._probes: dict[str, Probe] = {}
        self.stalled: tuple[Stall, ...] = ()

    def add(self, probe: Probe) -> None:
        self._probes[probe.task] = probe

    def remove(self, task: str) -> None:
        self._probes.pop(task, None)
        self.stalled = tuple(s for s in self.stalled if s.task != task)

    def check(self) -> tuple[Stall, ...]:
        now = self._clock()
        found = []
        for probe in list(self._probes.values()):
            stall = probe.check(now)
            if stall is not None:
                found.append(stall)
        before = {s.task for s in self.stalled}
        for stall in found:
            probe = self._probes[stall.task]
            if stall.task not in before:
                log.error(
                    "task.stalled",
                    task=stall.task,
                    reason=stall.reason,
                    for_s=stall.for_s,
                    deadline_s=stall.deadline_s,
                    action=probe.action,
                )
            if self._on_stall is not None and probe.action_due(now):
                self._on_stall(stall, probe)
        now_stalled = {s.task for s in found}
        for task in before - now_stalled:
            log.info("task.progressing", task=task)
        self.stalled = tuple(found)
        return self.stalled

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            self.check()
            await asyncio.sleep(interval_s)


__all__ = [
    "Heartbeats",
    "Probe",
    "Stall",
    "StallAction",
    "SupervisionPolicy",
    "Supervisor",
    "TaskFailed",
    "TaskStalled",
    "TaskState",
]
