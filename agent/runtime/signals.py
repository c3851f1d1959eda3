"""Signals (Unix only: the loop's add_signal_handler): SIGINT/SIGTERM stop the agent,
SIGHUP reloads its config file."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from agent.runtime.pipeline import Agent
from agent.runtime.reload import ReloadResult

log = structlog.get_logger()


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
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
