"""Which event loop `edge-agent run` uses: asyncio's own (the default), or uvloop.

uvloop is an optional dependency (`pip install 'edge-agent[uvloop]'`): at 100,000 values/s
the agent spends a large share of its CPU in the event loop itself (one socket write and
one wake-up per Modbus request, 1,300 requests/s), which uvloop does in C. It is not the
default because the bench has not shown a gain beyond the shared machine's noise, and
it adds ≈ 5 MB of RSS (bench/README.md, "CPU per million values (issue 11.5)"). Nothing
in the agent depends on which loop runs it.

`--event-loop asyncio` (the default) never imports uvloop; `uvloop` refuses to start
without it (exit 2, nothing started); `auto` takes uvloop when it can be imported, else
asyncio's.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Final, Literal

EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
CHOICES: Final[tuple[EventLoopChoice, ...]] = ("auto", "asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class EventLoopUnavailable(Exception):
    """The event loop asked for cannot be used (uvloop not installed)."""


def loop_factory(choice: EventLoopChoice) -> tuple[LoopFactory | None, str]:
    """(the factory for `asyncio.Runner`, None for asyncio's default; the loop's name)."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "uvloop":
            raise EventLoopUnavailable(
                f"--event-loop uvloop: uvloop is not installed ({exc}); install it with "
                "pip install 'edge-agent[uvloop]', or use --event-loop asyncio"
            ) from None
        return None, "asyncio"
    factory: LoopFactory = uvloop.new_event_loop
    return factory, f"uvloop {getattr(uvloop, '__version__', '?')}"


__all__ = ["CHOICES", "EventLoopChoice", "EventLoopUnavailable", "loop_factory"]
