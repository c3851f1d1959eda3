"""One MQTT message → the samples it carries. The only code of the dataset tools that
knows the wire layouts: the collector and `export --broker` call `decode` and nothing
else, so pointing them at another layout's decoder is a change of this one module.

Layouts understood (docs/mqtt.md):

- `edge-agent/batch/1` (layout `device`): ``{"schema", "agent", "epoch", "device",
  "samples": [...]}``;
- `edge-agent/sample/1` (layout `tag`): one sample with ``"schema", "agent", "epoch"``;
- `edge-agent/batch/2` (layout `lean`, the default) and `edge-agent/compact/1` with its
  metadata `edge-agent/meta/1` (layout `compact`): through the reference decoder
  `agent.layouts.decode` (docs/layouts.md). Compact metadata is remembered for the rest
  of the process; a metadata message itself carries no samples.

Every sample comes back as a plain dict with at least ``agent, epoch, device, tag, value,
quality, seq, ts_agent`` (timestamps stay ISO 8601 text, as on the wire) and the other
members the message had (``unit, reason, code, ts_source, value_text, historical``,
and any member a newer minor version adds). Sparkplug B messages carry no (epoch, seq)
identity per sample and are refused as an unknown layout.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.layouts.decode import DecodeError as LayoutDecodeError
from agent.layouts.decode import Decoder, MetaMissing

__all__ = ["DecodeError", "MalformedMessage", "UnknownLayout", "decode"]

BATCH = "edge-agent/batch/1"
SAMPLE = "edge-agent/sample/1"
#: Layouts read by the reference decoder (lean, compact and compact's metadata).
_REFERENCE = frozenset({"edge-agent/batch/2", "edge-agent/compact/1", "edge-agent/meta/1"})
#: One per process: compact metadata seen is kept for the data that needs it.
_DECODER = Decoder()

#: What every decoded sample has, with the type the dataset tools rely on.
_REQUIRED: tuple[tuple[str, type, str], ...] = (
    ("tag", str, "a string"),
    ("quality", str, "a string"),
    ("seq", int, "an integer"),
    ("ts_agent", str, "a string"),
)
_QUALITIES = frozenset({"good", "uncertain", "bad"})


class DecodeError(ValueError):
    """A message the dataset tools cannot use; the text says why."""


class UnknownLayout(DecodeError):
    """A message of a layout (schema) this decoder does not know."""


class MalformedMessage(DecodeError):
    """A message of a known layout whose content is not what the layout says."""


def decode(topic: str, payload: bytes) -> list[dict[str, Any]]:
    """The samples of one message (see the module docstring). Raises UnknownLayout or
    MalformedMessage, never anything else, for any payload."""
    if topic.startswith("spBv1.0/"):
        raise UnknownLayout("Sparkplug B: samples carry no (epoch, seq); not supported")
    try:
        data: Any = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage("not a JSON object")
    schema = data.get("schema")
    if schema == BATCH:
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise MalformedMessage("batch without a samples list")
        device = data.get("device")
        if not isinstance(device, str):
            raise MalformedMessage("batch without a device name")
        head = _identity(data)
        out = []
        for i, s in enumerate(samples):
            if not isinstance(s, dict):
                raise MalformedMessage(f"samples[{i}] is not an object")
            sample = {**s, **head}
            sample.setdefault("device", device)
            if data.get("historical") is True:
                sample["historical"] = True
            out.append(_checked(sample, f"samples[{i}]"))
        return out
    if schema in _REFERENCE:
        try:
            d = _DECODER.decode(data)
        except MetaMissing as exc:
            raise MalformedMessage(
                f"{exc}: subscribe to the metadata topic (mqtt.topic_meta) as well"
            ) from None
        except LayoutDecodeError as exc:
            raise MalformedMessage(str(exc)) from None
        if d.kind == "meta":
            return []  # remembered by the decoder; no samples of its own
        head = _identity({"agent": d.agent, "epoch": d.epoch})
        out = []
        for i, s in enumerate(d.samples):
            sample = {**s, **head}
            if d.historical:
                sample["historical"] = True
            out.append(_checked(sample, f"samples[{i}]"))
        return out
    if schema == SAMPLE:
        sample = {k: v for k, v in data.items() if k not in ("schema", "gaps")}
        return [_checked(sample, "sample")]
    if isinstance(schema, str):
        raise UnknownLayout(f"unknown schema {schema[:80]!r}")
    raise UnknownLayout("no schema member")


def _identity(data: dict[str, Any]) -> dict[str, Any]:
    agent, epoch = data.get("agent"), data.get("epoch")
    if not isinstance(agent, str) or not agent:
        raise MalformedMessage("no agent id")
    if not isinstance(epoch, str) or not epoch:
        raise MalformedMessage("no epoch")
    return {"agent": agent, "epoch": epoch}


def _checked(sample: dict[str, Any], where: str) -> dict[str, Any]:
    sample.update(_identity(sample))
    if not isinstance(sample.get("device"), str):
        raise MalformedMessage(f"{where}: no device name")
    for key, kind, what in _REQUIRED:
        value = sample.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MalformedMessage(f"{where}: {key} missing or not {what}")
    if sample["seq"] < 1:
        raise MalformedMessage(f"{where}: seq {sample['seq']} is below 1")
    if sample["quality"] not in _QUALITIES:
        raise MalformedMessage(
            f"{where}: quality {sample['quality'][:40]!r} is not good/uncertain/bad"
        )
    sample.pop("schema", None)
    return sample
