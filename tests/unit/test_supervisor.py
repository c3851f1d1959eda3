"""The supervisor and the heartbeats on their own: restart with backoff, one log line with
the traceback per failure, a task that keeps failing is fatal, cancellation is never
swallowed, a busy task without progress is stalled. Clocks and sleeps are fakes: no
timing thresholds."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from structlog.testing import capture_logs

from agent.runtime.supervisor import (
    Heartbeats,
    Probe,
    SupervisionPolicy,
    Supervisor,
    TaskFailed,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def supervisor(clock: FakeClock, **policy: float) -> tuple[Supervisor, list[float]]:
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        await asyncio.sleep(0)

    args = {"max_failures": 3, "window_s": 60.0, "backoff_min_s": 1.0, "backoff_max_s": 8.0}
    args.update(policy)
    sup = Supervisor(
        SupervisionPolicy(**args),  # type: ignore[arg-type]
        clock=clock,
        sleep=sleep,
        rng=lambda: 1.0,
    )
    return sup, slept


async def test_a_task_that_raises_once_is_restarted_and_logged_once_with_its_traceback() -> None:
    sup, slept = supervisor(FakeClock())
    runs = 0
    done = asyncio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        done.set()
        await asyncio.Event().wait()

    with capture_logs() as logs:
        sup.start("worker", work)
        async with asyncio.timeout(10):
            await done.wait()
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert len(failed) == 1
    assert failed[0]["task"] == "worker"
    assert failed[0]["error"] == "RuntimeError: boom"
    assert failed[0]["action"] == "restarting"
    assert isinstance(failed[0]["exc_info"], RuntimeError)  # rendered as a traceback
    assert failed[0]["log_level"] == "error"
    state = sup.states["worker"]
    assert (state.phase, state.starts, state.restarts, state.failures) == ("running", 2, 1, 1)
    assert slept == [1.0]
    assert sup.failure is None
    await sup.stop_all()


async def test_backoff_grows_between_restarts() -> None:
    sup, slept = supervisor(FakeClock(), max_failures=10)
    runs = 0
    done = asyncio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs <= 5:
            raise ValueError(str(runs))
        done.set()

    with capture_logs():
        sup.start("w", work)
        async with asyncio.timeout(10):
            await done.wait()
        await sup.wait("w")
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert sup.states["w"].phase == "done"


async def test_a_task_failing_n_times_within_the_window_is_fatal() -> None:
    sup, _ = supervisor(FakeClock(), max_failures=3)

    async def work() -> None:
        raise OSError(5, "Input/output error")

    with capture_logs() as logs:
        sup.start("forwarder", work)
        async with asyncio.timeout(10):
            failure = await sup.wait_failed()
    assert isinstance(failure, TaskFailed)
    assert failure.task == "forwarder"
    assert failure.error_text == "OSError: [Errno 5] Input/output error"
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert [e["action"] for e in failed] == ["restarting", "restarting", "agent exits"]
    assert sup.states["forwarder"].phase == "failed"
    assert sup.task("forwarder").done()  # type: ignore[union-attr]


async def test_failures_spread_wider_than_the_window_are_not_fatal() -> None:
    clock = FakeClock()
    sup, _ = supervisor(clock, max_failures=3, window_s=10.0)
    runs = 0
    done = asyncio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        clock.now += 6.0  # each run lasts 6 s, so at most 2 failures fall in 10 s
        if runs <= 6:
            raise RuntimeError("flaky")
        done.set()

    with capture_logs():
        sup.start("w", work)
        async with asyncio.timeout(10):
            await done.wait()
    assert sup.failure is None
    assert sup.states["w"].failures == 6


async def test_cancellation_propagates_and_is_never_restarted() -> None:
    sup, slept = supervisor(FakeClock())
    started = asyncio.Event()
    cleaned = False

    async def work() -> None:
        nonlocal cleaned
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned = True

    task = sup.start("w", work)
    await started.wait()
    await sup.stop("w", forget=False)
    assert task.cancelled()
    assert cleaned
    assert sup.states["w"].starts == 1
    assert slept == []


async def test_a_cancelled_error_raised_inside_the_task_is_not_swallowed() -> None:
    sup, slept = supervisor(FakeClock())

    async def work() -> None:
        raise asyncio.CancelledError

    task = sup.start("w", work)
    await asyncio.wait({task})
    assert task.cancelled()
    assert sup.states["w"].starts == 1
    assert sup.failure is None
    assert slept == []


async def test_a_task_that_returns_is_done_not_restarted() -> None:
    sup, _ = supervisor(FakeClock())
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1

    sup.start("w", work)
    assert await sup.wait("w", 10)
    assert runs == 1
    assert sup.states["w"].phase == "done"

    async def forever() -> None:
        await asyncio.Event().wait()

    sup.start("x", forever)
    with pytest.raises(ValueError, match="already running"):
        sup.start("x", forever)
    await sup.stop_all()


def test_a_busy_probe_without_progress_stalls_after_its_deadline() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    busy, count = True, 0
    beats.add(Probe("forwarder", lambda: busy, lambda: count, 30.0, "nothing sent"))
    with capture_logs() as logs:
        assert beats.check() == ()
        clock.now += 30.0
        assert beats.check() == ()  # at the deadline, not past it
        clock.now += 1.0
        (stall,) = beats.check()
        assert (stall.task, stall.reason, stall.for_s, stall.deadline_s) == (
            "forwarder",
            "nothing sent",
            31.0,
            30.0,
        )
        beats.check()  # still stalled: logged once
        count += 1
        assert beats.check() == ()
        clock.now += 100.0
        busy = False  # nothing to do: never stalled, however long
        assert beats.check() == ()
    events = [e["event"] for e in logs]
    assert events.count("task.stalled") == 1
    assert events.count("task.progressing") == 1


def test_a_removed_probe_is_forgotten() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.add(Probe("poll:a", lambda: True, lambda: 0, 1.0, "no poll finished"))
    beats.check()
    clock.now += 2
    assert [s.task for s in beats.check()] == ["poll:a"]
    beats.remove("poll:a")
    assert beats.stalled == ()
    assert beats.check() == ()


async def test_a_kicked_task_is_restarted_counted_and_fatal_when_it_keeps_stalling() -> None:
    sup, _ = supervisor(FakeClock(), max_failures=2)
    runs = 0
    cleaned = 0

    async def stuck() -> None:
        nonlocal runs, cleaned
        runs += 1
        try:
            await asyncio.Event().wait()  # never makes progress
        finally:
            cleaned += 1

    with capture_logs() as logs:
        task = sup.start("forwarder", stuck)
        for _ in range(5):
            await asyncio.sleep(0)
        assert sup.kick("forwarder", "stalled: nothing delivered")
        async with asyncio.timeout(5):
            while runs < 2:
                await asyncio.sleep(0)
        assert cleaned == 1  # the stuck run was cancelled, its finally ran
        assert sup.states["forwarder"].failures == 1
        assert not task.done()  # the supervisor itself goes on
        assert sup.kick("forwarder", "stalled: nothing delivered")
        failure = await asyncio.wait_for(sup.wait_failed(), 5)
    assert failure.task == "forwarder"
    assert failure.error_text == "TaskStalled: stalled: nothing delivered"
    assert [e["action"] for e in logs if e["event"] == "task.failed"] == [
        "restarting",
        "agent exits",
    ]
    assert not sup.kick("forwarder", "again")  # nothing left running
    await sup.stop_all()


async def test_stopping_a_task_is_not_mistaken_for_a_kick() -> None:
    sup, _ = supervisor(FakeClock())

    async def idle() -> None:
        await asyncio.Event().wait()

    task = sup.start("poll:a", idle)
    await asyncio.sleep(0)
    await sup.stop("poll:a")
    assert task.cancelled()
    assert sup.failure is None


def test_a_stalled_probe_acts_at_once_then_once_per_deadline() -> None:
    clock = FakeClock()
    acted: list[str] = []
    hb = Heartbeats(clock, on_stall=lambda stall, probe: acted.append(stall.task))
    hb.add(Probe("forwarder", lambda: True, lambda: 0, 10.0, "stuck", action="restart"))
    hb.add(Probe("status", lambda: True, lambda: 0, 10.0, "stuck"))  # report only
    hb.check()
    for t in (11.0, 15.0, 21.5, 22.0):
        clock.now = 1000.0 + t
        hb.check()
    assert acted == ["forwarder", "forwarder"]  # at 11 s, then at 21.5 s
    assert {s.task for s in hb.stalled} == {"forwarder", "status"}


async def test_a_task_that_swallows_its_cancellation_is_asked_again() -> None:
    """pymodbus swallows a cancellation while it connects: a stop must still end."""
    sup, _ = supervisor(FakeClock())
    cleaned = asyncio.Event()

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as a library might
            await asyncio.Event().wait()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    sup.start("poll:plc", stubborn)
    for _ in range(3):  # let the run reach its first wait
        await asyncio.sleep(0)
    with capture_logs() as logs:
        async with asyncio.timeout(10):
            await sup.stop("poll:plc")
    assert cleaned.is_set()
    assert [e["task"] for e in logs if e["event"] == "task.stop.repeated"] == ["poll:plc"]
