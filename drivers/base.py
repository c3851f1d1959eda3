"""The contract every protocol driver follows, and the pieces of config all drivers share.

A driver only connects, reads and closes (Benthos' input contract). Reconnects, backoff,
schedules and quality on failure belong to the framework (`agent.poller`): a driver
never retries on its own beyond the per-request retries its device config asks for,
and never loops reconnecting.

Drivers raise only the exceptions defined here; third-party exceptions are mapped at
the boundary (inside `drivers/<proto>/driver.py`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.derive.config import CycleConfig, ReportConfig, WindowConfig
from drivers.machines import MOULDING_ROLES, PRESS_ROLES
from drivers.machines import ROLES as MACHINE_ROLES

log = structlog.get_logger(__name__)

# A tag value as it leaves a driver and as it is published.
Scalar = bool | int | float | str
Value = Scalar | list[Scalar] | dict[str, object]

QualityName = Literal["good", "uncertain", "bad"]


@dataclass(slots=True)
class RawReading:
    """One tag's value as read from the device, before scaling and normalisation.

    `value` is None exactly when the quality is bad and the device gave no value.
    `reason` names why a reading is not good (a protocol status name, a Modbus
    exception, a timeout); `code` carries the raw numeric code where there is one.
    """

    tag: str
    value: Value | None
    quality: QualityName = "good"
    reason: str | None = None
    code: int | None = None
    ts_source: datetime | None = None


class DriverError(Exception):
    """Base of every exception a driver raises."""

    def __init__(self, reason: str, detail: str = "", code: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.code = code


class DriverUnavailable(DriverError):
    """The device cannot be reached or the connection was lost (refused, reset,
    timed out, session dead). The poller marks every tag of the device bad with
    `reason`, closes the driver and reconnects with backoff."""


class DriverConfigError(DriverError):
    """The device answered, but the configuration cannot work against it (for example a
    node id that does not exist). Reported once; the poller retries later as for
    DriverUnavailable, since a PLC download may fix it."""


SampleSink = Callable[[Sequence[RawReading]], Awaitable[None]]


@runtime_checkable
class Driver(Protocol):
    """One device. Created from its config; owns at most one connection."""

    async def connect(self) -> None:
        """Open the connection. Raises DriverUnavailable (or DriverConfigError)."""

    async def read(self, group: str) -> list[RawReading]:
        """One poll of poll group `group`: every tag of the group, in config order.

        A failure that concerns only some tags (a Modbus exception for one block, a bad
        OPC UA status for one node) is returned as bad readings for those tags. A failure
        of the connection raises DriverUnavailable.
        """

    async def close(self) -> None:
        """Close the connection; never raises."""


@runtime_checkable
class SubscribingDriver(Driver, Protocol):
    """A driver that can also push values (OPC UA monitored items)."""

    async def subscribe(self, group: str, sink: SampleSink) -> None:
        """Start delivering the group's readings to `sink` as they change. Returns once
        the subscription exists; readings keep arriving until close(). A lost
        connection is reported by raising DriverUnavailable from `wait_closed`."""

    async def wait_closed(self) -> None:
        """Return (by raising DriverUnavailable) when the connection is lost."""


class WriteRefused(DriverError):
    """A write the driver will not attempt (the tag's area cannot be written over this
    protocol, a value the tag's type cannot hold). Nothing was sent to the device."""


@runtime_checkable
class WritingDriver(Driver, Protocol):
    """A driver that can write one tag (setpoints from the platform, `edge-agent write`).

    The agent's command layer (agent/command/) has already checked every guard and turned
    the engineering value into the tag's raw value (the inverse of scale/offset, rounded
    and range-checked for integer types), so `raw` is a bool, int, float or str of the
    tag's configured type. The driver encodes it exactly as `read` decodes it (byte and
    word order, width) and writes it; bits are written with the protocol's bit write, or
    read-modify-write where it has none (the driver's README says which).

    Raises WriteRefused (nothing sent), DriverUnavailable (not connected / connection
    lost: the write may or may not have happened) or DriverError (the device refused it,
    e.g. a Modbus exception)."""

    async def write(self, tag: str, raw: Scalar) -> None:
        """Write tag `tag` (a name of this device's config) with raw value `raw`."""


@runtime_checkable
class ColumnReader(Protocol):
    """A driver that can also hand a poll over in columns: `read_columns(group)` returns
    (tag names, raw values, bad readings by index). `values[i]` is the raw value of
    `tags[i]` unless `i` is a key of the bad readings. The poller uses it instead of
    `read` when the driver has it: no object per value on the hot path."""

    async def read_columns(
        self, group: str
    ) -> tuple[Sequence[str], list[Value | None], dict[int, RawReading]]: ...


# ---------------------------------------------------------------- shared resources

T = TypeVar("T")


class DriverContext:
    """Resources the runtime lends to drivers and that outlive one driver: a serial line
    or a gateway connection used by every unit configured on it, say.

    `shared(key, factory)` returns the object made for `key`, making it with `factory()`
    the first time. The runtime owns the context: `await context.aclose()` at stop closes
    every shared object, newest first, each with its `aclose()` or `close()` (awaited
    when it returns an awaitable). A failing close does not stop the others; `aclose`
    never raises, and afterwards `shared` refuses to make anything."""

    def __init__(self, links: Mapping[str, Any] | None = None) -> None:
        #: The config's shared links by name (`links:`; drivers/links.py), for drivers
        #: whose device names one.
        self.links: Mapping[str, Any] = dict(links or {})
        self._objects: dict[Hashable, object] = {}
        self._closed = False
        #: What failed while closing, as (key, "Type: message"), for logs and tests.
        self.close_errors: list[tuple[Hashable, str]] = []

    def shared(self, key: Hashable, factory: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError(f"driver context is closed; cannot make {key!r}")
        if key not in self._objects:
            self._objects[key] = factory()
        return cast(T, self._objects[key])

    def __contains__(self, key: Hashable) -> bool:
        return key in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        self._closed = True
        while self._objects:
            key, obj = self._objects.popitem()  # newest first
            close: Any = getattr(obj, "aclose", None) or getattr(obj, "close", None)
            if close is None:
                continue
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # one bad resource must not keep the others open
                error = f"{type(exc).__name__}: {exc}"
                self.close_errors.append((key, error))
                log.warning("driver.context.close_failed", resource=repr(key), error=error)


# ---------------------------------------------------------------- shared config models


class ConfigModel(BaseModel):
    """Base of every config model: unknown keys are errors, no lax coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SimulateSpec(ConfigModel):
    """How the simulator drives a tag's value (simulator mode only)."""

    generator: Literal[
        "constant",
        "ramp",
        "sine",
        "random_walk",
        "counter",
        "toggle",
        "injection_moulding",
        "press",
    ] = Field(
        description="Shape of the simulated value over time; injection_moulding and press "
        "are simulated machines whose tags each show one `role` (drivers/machines.py)."
    )
    value: float | int | bool | str | None = Field(
        default=None, description="constant: the value; others: the starting value."
    )
    min: float | None = Field(default=None, description="Lower bound (ramp, sine, random_walk).")
    max: float | None = Field(default=None, description="Upper bound (ramp, sine, random_walk).")
    period_s: float = Field(
        default=60.0,
        gt=0,
        description="ramp/sine: seconds per cycle; toggle: seconds per state; "
        "injection_moulding: nominal cycle time of a shot; press: seconds per stroke.",
    )
    step: float = Field(
        default=1.0, description="counter: increment per period_s; random_walk: max step."
    )
    role: str | None = Field(
        default=None,
        description="injection_moulding / press only: the machine's signal this tag shows, "
        f"injection_moulding: {', '.join(MOULDING_ROLES)}; press: {', '.join(PRESS_ROLES)}.",
    )
    seed: int = Field(
        default=0,
        description="injection_moulding / press: which machine; tags with the same "
        "generator, period_s and seed show one machine.",
    )
    fault_period_s: float | None = Field(
        default=None,
        gt=0,
        description="press: a fault signature grows over each such period, then resets "
        "(as after a repair); none: a healthy press.",
    )

    @model_validator(mode="after")
    def _machine_fields(self) -> SimulateSpec:
        roles = MACHINE_ROLES.get(self.generator)
        if roles is None:
            extra = [
                k
                for k, default in (("role", None), ("seed", 0), ("fault_period_s", None))
                if getattr(self, k) != default
            ]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)}: only for the injection_moulding and press generators"
                )
            return self
        if self.role is None:
            raise ValueError(f"{self.generator} needs a role, one of: {', '.join(roles)}")
        if self.role not in roles:
            raise ValueError(
                f"role {self.role!r} is not one of {self.generator}'s: {', '.join(roles)}"
            )
        if self.fault_period_s is not None and self.generator != "press":
            raise ValueError("fault_period_s: only for the press generator")
        return self


class TagCommon(ConfigModel):
    """Fields every tag has, whatever the protocol."""

    name: str = Field(min_length=1, description="Tag name, unique within its device.")
    description: str | None = Field(default=None, description="Free text for people.")
    unit: str | None = Field(default=None, description="Unit of measure, e.g. kW, degC, 1/min.")
    scale: float = Field(default=1.0, description="Published value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="Published value = raw * scale + offset.")
    group: str = Field(default="default", description="Poll group this tag is read in.")
    simulate: SimulateSpec | None = Field(
        default=None, description="Simulated value in simulator mode (a default is chosen)."
    )
    report: ReportConfig | None = Field(
        default=None,
        description="Report by exception for this tag (overrides its group's and "
        "device's `report`); see docs/derive.md.",
    )


class PollGroup(ConfigModel):
    """A set of tags of one device read together at one interval."""

    interval_s: float = Field(gt=0, description="Seconds between polls of this group.")
    report: ReportConfig | None = Field(
        default=None,
        description="Report by exception for the tags of this group (overrides the "
        "device's `report`); see docs/derive.md.",
    )


class DeviceCommon(ConfigModel):
    """Fields every device has, whatever the protocol."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Device name: letters, digits, '_', '-', '.'; used in topics.",
    )
    enabled: bool = Field(default=True, description="A disabled device is not polled.")
    profile: str | None = Field(
        default=None,
        description="Device profile this device is built from: a name in `profiles`, or a "
        "YAML file relative to the config file; the device's own keys override the profile's.",
    )
    interval_s: float = Field(default=1.0, gt=0, description="Interval of the default group.")
    poll_groups: dict[str, PollGroup] = Field(
        default_factory=dict, description="Extra poll groups by name, each with its interval."
    )
    timeout_s: float = Field(default=1.0, gt=0, description="Timeout of one request.")
    retries: int = Field(default=1, ge=0, le=10, description="Retries of one request.")
    backoff_min_s: float = Field(default=1.0, gt=0, description="First reconnect delay.")
    backoff_max_s: float = Field(default=30.0, gt=0, description="Largest reconnect delay.")
    down_report_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="While the device is down: seconds between its all-bad sample sets "
        "(the transition itself is reported at once).",
    )
    report: ReportConfig | None = Field(
        default=None,
        description="Report by exception for every tag of the device (a group's or a "
        "tag's own `report` overrides it); see docs/derive.md.",
    )
    cycles: list[CycleConfig] = Field(
        default_factory=list,
        description="Cycle snapshots: one record per machine cycle (docs/derive.md).",
    )
    windows: list[WindowConfig] = Field(
        default_factory=list,
        description="Window features of chosen tags (docs/derive.md).",
    )

    def endpoint_text(self) -> str:
        """Where the device is, for people (`edge-agent simulate` prints it)."""
        endpoint = getattr(self, "endpoint", None)
        if isinstance(endpoint, str):
            return endpoint
        host, port = getattr(self, "host", None), getattr(self, "port", None)
        if host is not None:
            return f"{host}:{port}" if port is not None else str(host)
        return "-"

    def check(self, *, simulate: bool | None = None) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems that the field validators cannot see and that would otherwise only
        show when the device is started (a request plan that cannot be made, an endpoint
        that cannot be reached): (location inside this device, message) each, e.g.
        ``(("tags", 3, "type"), "...")``. `agent.config` reports them with file:line.

        simulate: True in simulator mode, False against real devices, None when the
        use is not known (endpoint checks are then skipped). None for most protocols."""
        return []

    def write_refusal(self, tag: str) -> str | None:
        """Why tag `tag` of this device cannot be written over its protocol (an input
        register, a read-only area), or None when it can. `validate` refuses
        `writable: true` on such a tag with this text. Default: no protocol writes."""
        return "this protocol's driver cannot write"

    def subscribe_groups(self) -> frozenset[str]:
        """Poll groups whose values the driver pushes (subscriptions) instead of being
        polled. None for most protocols; OPC UA devices override this."""
        return frozenset()

    def group_intervals(self) -> dict[str, float]:
        """Interval of every poll group, the implicit `default` one included."""
        groups = {"default": self.interval_s}
        groups.update({name: g.interval_s for name, g in self.poll_groups.items()})
        return groups


D = TypeVar("D", bound=DeviceCommon)


def served_at(devices: Sequence[D], endpoints: Mapping[str, tuple[str, int]]) -> dict[str, D]:
    """Device name → the device's config with `host`/`port` replaced by where its
    simulator listens (`endpoints`), for a protocol's `simulate` hook. A device served
    elsewhere than configured (port 0, or the port was taken) is logged once as
    `simulator.endpoint`."""
    served: dict[str, D] = {}
    for dev in devices:
        host, port = endpoints[dev.name]
        configured = (getattr(dev, "host", None), getattr(dev, "port", None))
        if (host, port) != configured:
            structlog.get_logger(__name__).info(
                "simulator.endpoint",
                device=dev.name,
                configured=f"{configured[0]}:{configured[1]}",
                serving=f"{host}:{port}",
            )
        served[dev.name] = dev.model_copy(update={"host": host, "port": port})
    return served
