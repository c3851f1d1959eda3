"""Reload logic: what a new config changes, decided before anything is touched.

A reload is all or nothing. `plan_reload` compares the running config with the new one:
a change outside `devices` is refused (those sections shape the buffer, the broker
session, the topics, the log setup, the listening socket and the supervision, so they need
a restart). The runtime then builds every new or changed device's driver (the part that can
fail: a request plan that does not fit, a driver that refuses its config) and swaps the
devices only when all of them were built. A reload that fails changes nothing, is counted
(`reloads_failed`) and logged (``config.reload.failed``).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config

# Sections a reload cannot change on the fly (see the module doc). A reload that changes
# one of them is refused as a whole, so the running config is always one whole version of
# the file.
RESTART_SECTIONS = (
    "agent",
    "buffer",
    "mqtt",
    "logging",
    "http",
    "supervision",
    "links",
    "commands",
)


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


async def read_config(path: Path | None, simulate: bool | None = None) -> Config | ReloadResult:
    """The config in `path`, checked as `run` (simulate False) or `run --simulate` (True)
    checks it, or a failed ReloadResult saying why it cannot be used."""
    if path is None:
        return ReloadResult(ok=False, problems=["no config file to reload from"])
    try:
        return await asyncio.to_thread(functools.partial(load_config, path, simulate=simulate))
    except ConfigError as exc:
        return ReloadResult(ok=False, problems=exc.problems)


def plan_reload(old: Config, new: Config, running: set[str]) -> ReloadResult:
    """Which devices start, stop, restart or stay, or (ok False) why the reload is refused."""
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
    current = {d.name: d for d in old.devices if d.name in running}
    result = ReloadResult(ok=True)
    for name, device in current.items():
        if name not in wanted:
            result.stopped.append(name)
        elif wanted[name] != device:
            result.restarted.append(name)
        else:
            result.unchanged.append(name)
    result.started = [n for n in wanted if n not in current]
    return result


__all__ = ["RESTART_SECTIONS", "ReloadResult", "plan_reload", "read_config"]
