"""Config models of the derive stage: report by exception, cycle snapshots, window
features (docs/derive.md). Plain pydantic, importing nothing of the agent or the drivers,
so that `drivers.base` can put them on every tag, poll group and device.

`check_device` holds the checks that need the whole device (tag names, poll groups, tag
types); `agent.config` reports them with file:line, for `validate` and `run` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Problem = tuple[tuple[str | int, ...], str]

#: Window features, in the order they are published.
Feature = Literal[
    "count",
    "mean",
    "min",
    "max",
    "std",
    "rms",
    "peak_to_peak",
    "crest_factor",
    "skewness",
    "kurtosis",
]
FEATURES: tuple[Feature, ...] = (
    "count",
    "mean",
    "min",
    "max",
    "std",
    "rms",
    "peak_to_peak",
    "crest_factor",
    "skewness",
    "kurtosis",
)
DEFAULT_FEATURES: tuple[Feature, ...] = ("count", "mean", "min", "max", "std", "rms")
#: The derived tag that carries a window's share of good samples.
GOOD_SHARE = "good_share"

NAME_PATTERN = r"^[A-Za-z0-9_\-]+$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ReportConfig(_Model):
    """Report by exception: which readings of a tag are published."""

    mode: Literal["exception", "every_poll"] = Field(
        default="exception",
        description="exception: publish a reading only when it differs from the last one "
        "published (beyond the deadband, if one is set), when its quality or reason "
        "changes, and as a heartbeat; every_poll: publish every reading (turns off a "
        "device's or group's `report` for one tag).",
    )
    deadband_abs: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Numbers: a reading within this distance of the last published value "
        "(in the tag's unit, after scale and offset) is not published.",
    )
    deadband_pct: float | None = Field(
        default=None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Numbers: a reading within this percentage of the last published "
        "value's magnitude is not published. With both deadbands the larger band applies. "
        "With neither, any change is published (on change).",
    )
    max_interval_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Heartbeat: when nothing was published for a tag for this long, its "
        "last published sample is sent again, with its original timestamps and "
        "`repeat: true` (never a new timestamp on an old value). None: no heartbeat.",
    )


class CycleTrigger(_Model):
    """What starts a cycle: exactly one of `edge`, `on`, `above`, `below`."""

    tag: str = Field(min_length=1, description="The tag watched (of this device).")
    edge: Literal["rising", "falling"] | None = Field(
        default=None, description="A bool tag going false → true (rising) or true → false."
    )
    on: Literal["change"] | None = Field(
        default=None,
        description="change: any change of the value, e.g. a shot counter. An integer "
        "value is the cycle id.",
    )
    above: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="A number crossing upwards: from ≤ above to > above.",
    )
    below: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="A number crossing downwards: from ≥ below to < below.",
    )
    hysteresis: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="above/below: the value must come back by this much past the "
        "threshold before the next crossing counts (against a value that hovers).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> CycleTrigger:
        given = [k for k in ("edge", "on", "above", "below") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of edge (rising|falling), on (change), above or below"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.hysteresis and given[0] not in ("above", "below"):
            raise ValueError("hysteresis applies to above/below triggers only")
        return self

    @property
    def kind(self) -> Literal["edge", "change", "above", "below"]:
        if self.edge is not None:
            return "edge"
        if self.on is not None:
            return "change"
        return "above" if self.above is not None else "below"


class CycleConfig(_Model):
    """A cycle snapshot: at each trigger, one record with the chosen tags."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Cycle name: letters, digits, '_', '-'. The record's tags are "
        "`NAME` (the cycle id) and `NAME.TAG` per captured tag.",
    )
    trigger: CycleTrigger = Field(description="What starts a cycle.")
    tags: list[str] = Field(
        min_length=1,
        description="Tags captured: from the trigger's poll (read: same_poll), or read "
        "again at the trigger (read: at_trigger).",
    )
    read: Literal["same_poll", "at_trigger"] = Field(
        default="same_poll",
        description="same_poll: the captured tags' values of the poll that saw the "
        "trigger (they must be in the trigger's poll group); at_trigger: the poller reads "
        "their poll groups again at once, and the record takes the first reading of each "
        "captured tag after the trigger.",
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="read: at_trigger: a captured tag not read within this time after the "
        "trigger is published bad in the record ('not read within read_timeout_s').",
    )
    debounce_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="A trigger within this many seconds of the previous one is ignored "
        "(a chattering bit); counted in the next record's `reason`.",
    )


class WindowConfig(_Model):
    """Tumbling windows over chosen tags, published as features `TAG.FEATURE`."""

    tags: list[str] = Field(min_length=1, description="Numeric tags of this device.")
    length_s: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description="Window length in seconds; windows are aligned to the wall clock "
        "(multiples of length_s since 1970-01-01 UTC).",
    )
    length_samples: int | None = Field(
        default=None, ge=2, le=1_000_000, description="Window length in readings of a tag."
    )
    features: list[Feature] = Field(
        default_factory=lambda: list(DEFAULT_FEATURES),
        min_length=1,
        description="Features published per tag (count, mean, min, max, std, rms, "
        "peak_to_peak, crest_factor, skewness, kurtosis); `TAG.good_share` is always "
        "published too.",
    )
    publish_raw: bool = Field(
        default=False,
        description="Also publish the raw readings of these tags (false: they stay local).",
    )

    @model_validator(mode="after")
    def _one_length(self) -> WindowConfig:
        if (self.length_s is None) == (self.length_samples is None):
            raise ValueError("give exactly one of length_s or length_samples")
        if len(set(self.features)) != len(self.features):
            raise ValueError("features: a feature is listed twice")
        return self


# ------------------------------------------------------------------- device checks

TagKind = Literal["bool", "number", "text", "array", "unknown"]

_BOOL = {"bool", "bit", "boolean"}
_NUMBER = {
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32",
    "float64", "byte", "int", "dint", "word", "dword", "real", "lreal", "sbyte", "float", "double",
}  # fmt: skip


def tag_kind(tag: Any) -> TagKind:
    """What a tag's values are, from its protocol's `type` (or `resolved_type()`)."""
    resolve = getattr(tag, "resolved_type", None)
    try:
        kind = resolve() if callable(resolve) else getattr(tag, "type", None)
    except Exception:
        kind = None
    if getattr(tag, "table", None) in ("coil", "discrete_input"):
        return "bool"
    if getattr(tag, "array_length", None):
        return "array"
    if not isinstance(kind, str):
        return "unknown"
    k = kind.lower()
    if k in _BOOL:
        return "bool"
    if k in _NUMBER:
        return "number"
    return "text"


def check_device(device: Any) -> list[Problem]:
    """Problems of a device's `report`, `cycles` and `windows` that need its tags."""
    tags: Sequence[Any] = list(getattr(device, "tags", []))
    by_name = {t.name: t for t in tags}
    subscribed: frozenset[str] = device.subscribe_groups()
    out: list[Problem] = []

    def known(loc: tuple[str | int, ...], name: str) -> Any:
        tag = by_name.get(name)
        if tag is None:
            out.append((loc, f"unknown tag {name!r} (tags of this device: {_names(by_name)})"))
        return tag

    def report_checks(loc: tuple[str | int, ...], report: ReportConfig | None, tag: Any) -> None:
        if report is None or tag is None:
            return
        band = report.deadband_abs is not None or report.deadband_pct is not None
        if band and tag_kind(tag) in ("bool", "text", "array"):
            out.append((loc, f"a deadband needs a numeric tag; {tag.name!r} is {tag_kind(tag)}"))

    for j, tag in enumerate(tags):
        report_checks(("tags", j, "report"), getattr(tag, "report", None), tag)
    # A device's or group's deadband applies to its numeric tags; the others are reported
    # on change (docs/derive.md), so only a tag's own deadband can be wrong.

    derived: dict[str, tuple[str | int, ...]] = {}

    def claim(name: str, loc: tuple[str | int, ...]) -> None:
        if name in by_name:
            out.append((loc, f"derived tag {name!r} has the name of a tag of this device"))
        elif name in derived:
            out.append((loc, f"derived tag {name!r} is also made by {_where(derived[name])}"))
        else:
            derived[name] = loc

    for i, cycle in enumerate(getattr(device, "cycles", [])):
        loc: tuple[str | int, ...] = ("cycles", i)
        trig = cycle.trigger
        tag = known((*loc, "trigger", "tag"), trig.tag)
        claim(cycle.name, (*loc, "name"))
        if tag is not None:
            kind = tag_kind(tag)
            if trig.kind == "edge" and kind not in ("bool", "unknown"):
                out.append(
                    (
                        (*loc, "trigger", "edge"),
                        f"an edge needs a bool tag; {tag.name!r} is {kind} "
                        "(use on: change for a counter, above/below for a level)",
                    )
                )
            if trig.kind in ("above", "below") and kind not in ("number", "unknown"):
                out.append(
                    (
                        (*loc, "trigger", trig.kind),
                        f"a threshold needs a numeric tag; {tag.name!r} is {kind}",
                    )
                )
            if tag.group in subscribed:
                out.append(
                    (
                        (*loc, "trigger", "tag"),
                        f"{tag.name!r} is in subscribed group {tag.group!r}: a notification "
                        "holds only the values that changed, not a whole poll; put the "
                        "trigger and its tags in a polled group",
                    )
                )
        seen: set[str] = set()
        for k, name in enumerate(cycle.tags):
            t = known((*loc, "tags", k), name)
            if name in seen:
                out.append(((*loc, "tags", k), f"tag {name!r} is listed twice"))
            seen.add(name)
            claim(f"{cycle.name}.{name}", (*loc, "tags", k))
            if t is not None and cycle.read == "at_trigger" and t.group in subscribed:
                out.append(
                    (
                        (*loc, "tags", k),
                        f"{name!r} is in subscribed group {t.group!r}, which cannot be "
                        "read on demand (read: at_trigger); put it in a polled group",
                    )
                )
            if (
                t is not None
                and tag is not None
                and cycle.read == "same_poll"
                and t.group != tag.group
            ):
                out.append(
                    (
                        (*loc, "tags", k),
                        f"{name!r} is read in poll group {t.group!r}, the trigger "
                        f"{tag.name!r} in {tag.group!r}: a snapshot takes its values from "
                        "the trigger's poll; move the tag into that group, or use "
                        "read: at_trigger",
                    )
                )

    for i, window in enumerate(getattr(device, "windows", [])):
        loc = ("windows", i)
        for k, name in enumerate(window.tags):
            t = known((*loc, "tags", k), name)
            if t is not None and tag_kind(t) in ("bool", "text", "array"):
                out.append(
                    (
                        (*loc, "tags", k),
                        f"window features need a numeric tag; {name!r} is {tag_kind(t)}",
                    )
                )
            for feature in (*window.features, GOOD_SHARE):
                claim(f"{name}.{feature}", (*loc, "tags", k))
    return out


def _names(by_name: dict[str, Any]) -> str:
    names = sorted(by_name)
    shown = ", ".join(names[:10])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 10 else "") or "none"


def _where(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
