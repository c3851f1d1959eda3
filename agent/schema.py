"""The common Sample schema and the published payloads (versioned).

These pydantic models *are* the schema: `edge-agent schema` writes their JSON Schema to
`schema/`, consumers can validate against it, and the tests validate every message the
agent publishes against these models.

The hot path does not build a pydantic object per value (≈ 2 µs each, see
docs/library-notes.md): `agent.normalize` builds plain dicts of exactly this shape, encoded once
with orjson when they enter the buffer. The tests hold the two together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

from drivers.base import Value

#: A published value: a scalar, or lists (OPC UA arrays, also multi-dimensional) and
#: objects (OPC UA structures) of them, to any depth the agent publishes
#: (agent.normalize.MAX_DEPTH); list items may be null.
PublishedValue = TypeAliasType(
    "PublishedValue",
    "bool | int | float | str | list[PublishedValue | None] | dict[str, PublishedValue | None]",
)

SCHEMA_VERSION = 1
#: Layout device (every sample in full; the default before layout lean).
BATCH_SCHEMA = f"edge-agent/batch/{SCHEMA_VERSION}"
SAMPLE_SCHEMA = f"edge-agent/sample/{SCHEMA_VERSION}"
#: Layout lean (the default): the batch, version 2.
LEAN_SCHEMA = "edge-agent/batch/2"
COMPACT_SCHEMA = "edge-agent/compact/1"
META_SCHEMA = "edge-agent/meta/1"

Quality = Literal["good", "uncertain", "bad"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sample(_Wire):
    """One value of one tag at one time, with its quality."""

    device: str = Field(description="Device name from the config.")
    tag: str = Field(description="Tag name from the config.")
    value: PublishedValue | None = Field(
        description="Typed value (bool, int, float, str, list, or object for structures) "
        "after scale and offset; null when quality is bad and no value was read, when "
        "the value cannot be carried exactly (quality bad, value_text holds it), or when "
        "the device's value itself is empty (an OPC UA null Variant: quality bad, reason "
        "'null value'). A good sample always has a value."
    )
    value_text: str | None = Field(
        default=None,
        description="Only when the value cannot be carried as JSON (quality bad, value "
        "null): the value as text: 'NaN', 'Infinity', '-Infinity' (reason 'not a "
        "number' / 'infinite'), the digits of an integer outside the 64-bit range "
        "('out of range'), ... Absent otherwise.",
    )
    quality: Quality = Field(description="good, uncertain or bad.")
    reason: str | None = Field(
        default=None,
        description="Why the quality is not good: OPC UA status name, Modbus exception, "
        "timeout, unreachable, not a number, infinite, out of range, ... null when good, "
        "except that a good sample whose device timestamp could not be published says "
        "why here ('ts_source out of range', 'ts_source without time zone').",
    )
    code: int | None = Field(
        default=None, description="Raw numeric status (OPC UA StatusCode, Modbus exception)."
    )
    ts_source: datetime | None = Field(
        default=None,
        description="Timestamp from the device, where the protocol has one; null when the "
        "device gave none, or one before 1970, in year 9999 or without a time zone "
        "(OPC UA's DateTime 0 is 1601-01-01).",
    )
    ts_agent: datetime = Field(description="When the agent read the value (UTC).")
    unit: str | None = Field(default=None, description="Unit of measure from the config.")
    seq: int = Field(
        ge=1,
        description="Per-agent sequence number: strictly increasing within an epoch, "
        "persisted across restarts. A gap means samples were dropped; a repeat is a "
        "duplicate delivery. (agent, epoch, seq) identifies a sample.",
    )
    # Optional members of derived samples (docs/derive.md); absent on raw samples.
    repeat: bool | None = Field(
        default=None,
        description="Report by exception: true on a heartbeat, a re-send of the tag's last "
        "published sample with its original value, quality and timestamps (only seq is "
        "new). Absent otherwise.",
    )
    cycle: int | None = Field(
        default=None,
        description="Cycle snapshots: the cycle id, on every sample of the cycle's record "
        "(the counter's value, or a durable sequence per device and cycle name). Absent "
        "otherwise.",
    )
    missed: CyclesMissed | None = Field(
        default=None,
        description="Cycle snapshots, on the cycle's own sample: cycle ids the counter "
        "skipped since the previous snapshot. Absent when none were missed.",
    )
    window_start: datetime | None = Field(
        default=None,
        description="Window features: start of the window (inclusive); ts_agent is its "
        "end. Absent otherwise.",
    )


class CyclesMissed(_Wire):
    """Cycles a counter skipped between two snapshots (agent.derive.cycles)."""

    first: int = Field(description="First cycle id not seen.")
    last: int = Field(description="Last cycle id not seen.")
    count: int = Field(description="Cycles not seen (last - first + 1).")


class GapNotice(_Wire):
    """Samples the agent dropped and will never deliver (see docs/mqtt.md)."""

    first_seq: int = Field(description="First seq of the range.")
    last_seq: int = Field(description="Last seq of the range.")
    count: int = Field(description="Samples dropped in the range.")
    reason: str = Field(
        description="drop_oldest, drop_newest, too_large, max_age, memory_full, corrupt, "
        "dead_letter (set aside; can be replayed), skipped (seqs leased before an unclean "
        "stop and never handed out, or possibly handed out before a power cut)."
    )
    epoch: str | None = Field(
        default=None,
        description="The epoch the range's seqs belong to, when it is not the message's.",
    )


_HISTORICAL = Field(
    default=False,
    description="True for backlog: appended before the current broker connection came up, "
    "or sent before without an acknowledgement. Absent for live data.",
)
_EPOCH = Field(
    description="Id of the agent's buffer (made when the buffer file was created; a new "
    "one after a lost or replaced file, a reinstall, a memory buffer's start). Seqs are "
    "unique within an epoch: consumers deduplicate on (agent, epoch, seq)."
)
_GAPS = Field(
    default=None,
    description="Seq ranges dropped since the last acknowledged notice; carried by the "
    "next message after a drop.",
)


class BatchPayload(_Wire):
    """Default layout: one message per device per poll, carrying all its samples."""

    schema_: str = Field(alias="schema", description=f"Always '{BATCH_SCHEMA}'.")
    agent: str = Field(description="agent.id from the config.")
    epoch: str = _EPOCH
    site: str | None = None
    area: str | None = None
    line: str | None = None
    device: str
    samples: list[Sample]
    historical: bool = _HISTORICAL
    gaps: list[GapNotice] | None = _GAPS


class SamplePayload(Sample):
    """Per-tag layout: one message per sample."""

    schema_: str = Field(alias="schema", description=f"Always '{SAMPLE_SCHEMA}'.")
    agent: str = Field(description="agent.id from the config.")
    epoch: str = _EPOCH
    historical: bool = _HISTORICAL
    gaps: list[GapNotice] | None = _GAPS


_TS = Field(
    description="ts_agent of every sample of the message, unless its `extra` entry gives its own."
)
_TS_CHANGES = Field(
    default=None,
    description="[[i, ts], ...]: from sample i on, ts_agent is ts (only when it changes "
    "within the message: records of several polls, subscription deliveries).",
)
_SEQ = Field(
    min_length=2,
    max_length=2,
    description="[first, last] seq of the message's samples: sample n has seq first + n, "
    "unless `seqs` is present.",
)
_SEQS = Field(
    default=None,
    description="Every sample's seq, in order; only when they are not consecutive.",
)


class SampleExtra(BaseModel):
    """What one sample says beyond the message's defaults (only what differs): quality,
    reason and code of a sample that is not good, value_text, ts_source, its own
    ts_agent or unit. `absent`: fields the sample does not have at all (rare)."""

    model_config = ConfigDict(extra="allow")

    quality: Quality | None = None
    reason: str | None = None
    code: int | None = None
    value_text: str | None = None
    ts_source: datetime | None = None
    ts_agent: datetime | None = None
    unit: str | None = None
    absent: list[str] | None = None


class LeanExtra(SampleExtra):
    i: int = Field(ge=0, description="Index of the sample in `tags`/`values`.")


class CompactExtra(SampleExtra):
    n: int = Field(ge=0, description="Index of the sample in `v`.")
    value: PublishedValue | None = Field(
        default=None,
        description="The exact value, when `v` cannot carry it as its entry's type says "
        "(a value of a float32 entry that is not a float32); `v` holds null then.",
    )


class LeanPayload(_Wire):
    """Layout lean (default): one message per device per poll; names and units once, a
    sample's other fields only where they differ from the defaults."""

    schema_: str = Field(alias="schema", description=f"Always '{LEAN_SCHEMA}'.")
    agent: str = Field(description="agent.id from the config.")
    site: str | None = Field(default=None, description="agent.site (absent when not set).")
    area: str | None = Field(default=None, description="agent.area (absent when not set).")
    line: str | None = Field(default=None, description="agent.line (absent when not set).")
    epoch: str = _EPOCH
    device: str
    ts: datetime | None = _TS
    ts_changes: list[tuple[int, datetime | None]] | None = _TS_CHANGES
    seq: list[int] = _SEQ
    seqs: list[int] | None = _SEQS
    tags: list[str] = Field(description="Tag of each sample, in seq order.")
    values: list[PublishedValue | None] = Field(
        description="Value of each sample (null: no value; the sample is not good)."
    )
    units: dict[str, str] | None = Field(default=None, description="Unit of each tag that has one.")
    extra: list[LeanExtra] | None = Field(
        default=None, description="Per-sample fields that differ from the defaults."
    )
    historical: bool = _HISTORICAL
    gaps: list[GapNotice] | None = _GAPS


class CompactPayload(_Wire):
    """Layout compact: values by index into the device's metadata (MetaPayload)."""

    schema_: str = Field(alias="schema", description=f"Always '{COMPACT_SCHEMA}'.")
    agent: str = Field(description="agent.id from the config.")
    epoch: str = _EPOCH
    device: str
    meta: str = Field(description="Id of the metadata (index → tag, type, unit) to apply.")
    ts: datetime | None = _TS
    ts_changes: list[tuple[int, datetime | None]] | None = _TS_CHANGES
    seq: list[int] = _SEQ
    seqs: list[int] | None = _SEQS
    i: int | list[int] | None = Field(
        default=None,
        description="Metadata index of sample 0 (the others follow on), or of every "
        "sample; absent: 0.",
    )
    v: list[PublishedValue | None] = Field(
        description="Value of each sample; a float32 entry's value with the fewest digits "
        "that round to the same float32."
    )
    extra: list[CompactExtra] | None = Field(
        default=None, description="Per-sample fields that differ from the defaults."
    )
    historical: bool = _HISTORICAL
    gaps: list[GapNotice] | None = _GAPS


class MetaEntry(_Wire):
    tag: str
    type: Literal["bool", "int", "float32", "float64", "string", "json"] | None = Field(
        default=None, description="Type of the tag's values (absent: not known yet)."
    )
    unit: str | None = Field(default=None, description="Unit (absent: none).")


class MetaPayload(_Wire):
    """Layout compact's metadata of one device (retained on mqtt.topic_meta)."""

    schema_: str = Field(alias="schema", description=f"Always '{META_SCHEMA}'.")
    agent: str
    site: str | None = None
    area: str | None = None
    line: str | None = None
    device: str
    meta: str = Field(description="Id of this mapping (a hash of its entries).")
    tags: list[MetaEntry] = Field(description="Entries by index (from `first` in a part).")
    part: int | None = Field(default=None, description="Part number, from 0 (when in parts).")
    parts: int | None = Field(default=None, description="Number of parts (when in parts).")
    first: int | None = Field(default=None, description="Index of this part's first entry.")


class WireSample(TypedDict):
    """A Sample as the hot path builds it: a plain dict of exactly the Sample fields."""

    device: str
    tag: str
    value: Value | None
    quality: Quality
    reason: str | None
    code: int | None
    ts_source: datetime | None
    ts_agent: datetime
    unit: str | None
    seq: int
    value_text: NotRequired[str]  # only when the value was made bad (agent.normalize)
    # agent.derive: only on derived samples
    repeat: NotRequired[bool]
    cycle: NotRequired[int]
    missed: NotRequired[dict[str, int]]
    window_start: NotRequired[datetime]


#: The fields every WireSample has, in order (the optional members come after them).
SAMPLE_FIELDS: tuple[str, ...] = (
    "device",
    "tag",
    "value",
    "quality",
    "reason",
    "code",
    "ts_source",
    "ts_agent",
    "unit",
    "seq",
)
