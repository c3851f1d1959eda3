"""The protocol registry: protocol name → what the agent needs to know about it.

The agent (config, runtime, simulator mode, CLI, schema, docs) never imports a protocol by
name; it asks this registry. A protocol lives in `drivers/<proto>/` and exposes, in its
package `__init__.py`, a module attribute `PROTOCOL` (a `Protocol` entry). It joins the
agent by one line: its module name in `BUILTIN` below, or, for a protocol shipped in a
package of its own, an entry point in the group `edge_agent.protocols` that names its
`Protocol` entry (or a module holding `PROTOCOL`). Tests register one with `register()`
or `registered()`.

The built-ins and entry points are loaded on first use, not at import, so importing
`drivers.registry` is cheap and free of cycles. A protocol's module should import only
its pydantic config models at import time: the driver, simulator, planner and CLI hooks
import their protocol library when they are called (asyncua costs ~0.4 s to import).

`generation()` changes with every registration, so what is built from the registry (the
config model's device union, the JSON Schema) can be rebuilt when a protocol joins
after import.
"""

from __future__ import annotations

import argparse
import importlib
import threading
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import structlog
from pydantic import BaseModel

from drivers.base import DeviceCommon, Driver, DriverContext

log = structlog.get_logger(__name__)

#: The protocols that ship with the agent, by module. Adding one is this one line.
BUILTIN: tuple[str, ...] = (
    "drivers.modbus",
    "drivers.opcua",
    "drivers.xgt",
    "drivers.melsec",
    "drivers.s7",
)

#: Entry point group of protocols installed as packages of their own.
ENTRY_POINT_GROUP = "edge_agent.protocols"

#: Names a protocol may list in `capabilities` (what the agent may rely on):
#: "subscribe": its driver can be a SubscribingDriver (some groups pushed, not polled);
#: "columns": its driver has `read_columns` (ColumnReader);
#: "shared_links": its devices share links through DriverContext.shared;
#: "write": its driver is a WritingDriver (`write(tag, raw)`), and its device model's
#: `write_refusal(tag)` says which tags cannot be written;
#: "simulate": it has a simulator (set automatically when `simulate` is given).
CAPABILITIES = frozenset({"subscribe", "columns", "shared_links", "write", "simulate"})

DriverFactory = Callable[[Any, DriverContext], Driver]
"""`create_driver(device, context) -> Driver`: the device is an instance of the
protocol's `device_model`. Must not do I/O (the poller calls `connect()`)."""

SimulatorFactory = Callable[[Sequence[Any]], AbstractAsyncContextManager[Mapping[str, Any]]]
"""`simulate(devices)`: an async context manager that serves simulated equipment for
every given (enabled) device of this protocol and yields device name → the device's
config pointing at its simulator (endpoint replaced); stops serving on exit."""

PlanFormatter = Callable[[Sequence[Any]], str]
"""`plan(devices) -> str`: what `edge-agent plan` prints for the protocol's devices
(all of them at once, so requests sharing a link can be summed). Raises ValueError for a
config that validates but cannot be planned; the CLI prints it and exits 2."""

LinkPlanFormatter = Callable[[Mapping[str, Any], Sequence[Any]], tuple[str, list[str]]]
"""`plan_links(links, devices) -> (text, warnings)`: what `edge-agent plan` adds for the
config's shared links (`links:`, see drivers/links.py) that the protocol's devices use —
bus time per cycle against their intervals; each warning is printed as `warning: ...`."""

LinkSimulatorFactory = Callable[
    [Mapping[str, Any], Sequence[Any]], AbstractAsyncContextManager[Mapping[str, Any]]
]
"""`simulate_links(links, devices)`: serves the shared links the given devices use and
yields link name → the link config rewritten to reach the simulator (a pty for a serial
line, a loopback port for a device server or gateway); stops serving on exit."""

CommandsHook = Callable[["argparse._SubParsersAction[Any]"], None]
"""`add_commands(subparsers)`: adds the protocol's own subcommands (`edge-agent opcua
browse ...`); each parser sets `func`, taking the parsed arguments, returning the exit
code."""


@dataclass(frozen=True)
class Protocol:
    """One protocol, as the agent sees it."""

    name: str
    device_model: type[DeviceCommon]
    create_driver: DriverFactory
    simulate: SimulatorFactory | None = None
    plan: PlanFormatter | None = None
    add_commands: CommandsHook | None = None
    plan_links: LinkPlanFormatter | None = None
    simulate_links: LinkSimulatorFactory | None = None
    capabilities: frozenset[str] = frozenset()
    #: One line for people: `edge-agent protocols` and the config reference print it.
    summary: str = ""
    #: The tag model, for the config reference; default: the item type of `tags`.
    tag_model: type[BaseModel] | None = None
    #: Where it came from (a module or entry point), for error messages.
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problems = _entry_problems(self)
        if problems:
            raise ValueError(f"protocol {self.name!r}: " + "; ".join(problems))
        caps = set(self.capabilities)
        if self.simulate is not None:
            caps.add("simulate")
        object.__setattr__(self, "capabilities", frozenset(caps))
        if self.tag_model is None:
            object.__setattr__(self, "tag_model", _tags_item_model(self.device_model))


class UnknownProtocol(LookupError):
    """No protocol of that name is registered."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown protocol {name!r}; registered: {', '.join(known) or 'none'}")
        self.name = name


def _entry_problems(entry: Protocol) -> list[str]:
    problems = []
    if not entry.name.isidentifier() or entry.name != entry.name.lower():
        problems.append("the name must be a lower-case identifier")
    model = entry.device_model
    if not (isinstance(model, type) and issubclass(model, DeviceCommon)):
        problems.append("device_model must be a subclass of drivers.base.DeviceCommon")
    else:
        fld = model.model_fields.get("protocol")
        allowed = typing.get_args(fld.annotation) if fld is not None else ()
        if fld is None or typing.get_origin(fld.annotation) is not typing.Literal:
            problems.append(f"{model.__name__} needs a field protocol: Literal[{entry.name!r}]")
        elif allowed != (entry.name,):
            problems.append(
                f"{model.__name__}.protocol allows {list(allowed)}, must be [{entry.name!r}]"
            )
    if not callable(entry.create_driver):
        problems.append("create_driver must be callable")
    unknown = set(entry.capabilities) - CAPABILITIES
    if unknown:
        problems.append(
            f"unknown capabilities {sorted(unknown)}; known: {', '.join(sorted(CAPABILITIES))}"
        )
    return problems


def _tags_item_model(model: type[DeviceCommon]) -> type[BaseModel] | None:
    fld = model.model_fields.get("tags") if isinstance(model, type) else None
    for arg in typing.get_args(fld.annotation) if fld is not None else ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


# ---------------------------------------------------------------- the registry itself

_lock = threading.RLock()
_entries: dict[str, Protocol] = {}
_generation = 0
_loaded = False
_loading = False


def _load_builtins() -> None:
    """Import the built-in protocols and the entry points, once."""
    global _loaded, _loading
    with _lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            for module_name in BUILTIN:
                entry = _entry_of(importlib.import_module(module_name), module_name)
                if entry.name not in _entries:
                    _add(entry)
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    entry = _entry_of(ep.load(), f"entry point {ep.name} ({ep.value})")
                except Exception as exc:  # a broken plugin must not stop the agent
                    log.error(
                        "registry.plugin.failed",
                        entry_point=ep.name,
                        value=ep.value,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    continue
                if entry.name in _entries:
                    log.error("registry.plugin.duplicate", entry_point=ep.name, protocol=entry.name)
                    continue
                _add(entry)
            _loaded = True
        finally:
            _loading = False


def _entry_of(obj: object, origin: str) -> Protocol:
    entry = getattr(obj, "PROTOCOL", obj)
    if not isinstance(entry, Protocol):
        raise TypeError(f"{origin} gives {type(entry).__name__}, not a drivers.registry.Protocol")
    if not entry.origin:
        object.__setattr__(entry, "origin", origin)
    return entry


def _add(entry: Protocol) -> None:
    global _generation
    _entries[entry.name] = entry
    _generation += 1


def register(entry: Protocol, *, replace: bool = False) -> Protocol:
    """Add a protocol. A second protocol of the same name is refused unless `replace`."""
    with _lock:
        _load_builtins()
        if entry.name in _entries and not replace:
            raise ValueError(
                f"protocol {entry.name!r} is already registered"
                f" (from {_entries[entry.name].origin or 'register()'})"
            )
        _add(entry)
        return entry


def unregister(name: str) -> None:
    """Remove a protocol (tests); unknown names are ignored."""
    global _generation
    with _lock:
        if _entries.pop(name, None) is not None:
            _generation += 1


@contextmanager
def registered(entry: Protocol) -> Iterator[Protocol]:
    """Register `entry` for the duration of a `with` block (tests)."""
    with _lock:
        _load_builtins()
        previous = _entries.get(entry.name)
    register(entry, replace=True)
    try:
        yield entry
    finally:
        with _lock:
            if previous is not None:
                _add(previous)
            else:
                unregister(entry.name)


def protocols() -> dict[str, Protocol]:
    """Every registered protocol, built-ins first, in registration order (a copy)."""
    with _lock:
        _load_builtins()
        return dict(_entries)


def get(name: str) -> Protocol:
    """The protocol called `name`; raises UnknownProtocol."""
    with _lock:
        _load_builtins()
        entry = _entries.get(name)
        if entry is None:
            raise UnknownProtocol(name, list(_entries))
        return entry


def generation() -> int:
    """Changes whenever the set of protocols changes (for caches built from it)."""
    with _lock:
        _load_builtins()
        return _generation


def protocol_of(device: DeviceCommon) -> Protocol:
    """The protocol entry of a configured device."""
    return get(str(getattr(device, "protocol", "?")))


def create_driver(device: DeviceCommon, context: DriverContext) -> Driver:
    """The driver of a configured device (no I/O; `connect()` does that)."""
    entry = protocol_of(device)
    if not isinstance(device, entry.device_model):
        raise TypeError(
            f"device {device.name!r}: a {type(device).__name__} is not a "
            f"{entry.device_model.__name__} (protocol {entry.name!r})"
        )
    return entry.create_driver(device, context)
