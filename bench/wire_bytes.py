"""Bytes per value on the wire, per layout, and messages per record at a packet limit.

    .venv/bin/python -m bench.wire_bytes [--polls N] [--json]

In one process and one run, for each workload: the real normaliser makes the samples of
N polls (values from the simulators' own generators, float32 registers rounded to
float32), the real buffer encoding stores each poll as a record, and the real encoder of
every layout — today's `device` side by side with `lean`, `compact`, `tag` and
`sparkplug` — turns it into messages. Bytes are MQTT PUBLISH packets (`packet_size`:
fixed header, topic, packet id, payload; what the broker counts against its Maximum
Packet Size), averaged over the polls after the first (the steady state: Sparkplug's
births and compact's retained metadata are counted apart, as `once` bytes). Messages
per record: the forwarder's own split (`Forwarder._encode_fitting`) at 16 KiB and
128 KiB.

Workloads:
- `uint16x1000`: one device, 1,000 uint16 counter registers (values over the whole
  0..65535 range, seeded: the worst case for text encodings);
- `mixed`: one device of the bench's `modbus-wide` scenario (bench/scenarios.py): a uint32
  clock and 999 tags of int16, float32 and int32 in four byte orders, default simulator
  generators (sine for float32, counters for integers).
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from agent.buffer import Record
from agent.buffer.common import encode_batch
from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.normalize import Normalizer, SeqCounter
from agent.payload import PayloadEncoder
from agent.publish import packet_size
from agent.publish.fake import FakePublisher
from agent.publish.sparkplug import SparkplugNode
from bench.scenarios import modbus_tags
from drivers.base import RawReading, TagCommon
from drivers.generators import default_spec, make_generator

LAYOUTS = ("device", "lean", "compact", "tag", "sparkplug")
LIMITS = (16 * 1024, 128 * 1024)
AGENT = AgentSection(id="gw-line4", site="plant-a", area="assembly", line="line-4")
_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    return float(_F32.unpack(_F32.pack(x))[0])


def uint16_polls(polls: int) -> tuple[list[TagCommon], list[list[RawReading]]]:
    rng = random.Random(11)
    tags = [TagCommon(name=f"c{i:04d}") for i in range(1000)]
    counters = [rng.randrange(65536) for _ in tags]
    out = []
    for _ in range(polls):
        counters = [(c + rng.randrange(3)) % 65536 for c in counters]
        out.append([RawReading(t.name, c) for t, c in zip(tags, counters, strict=True)])
    return tags, out


def mixed_polls(polls: int) -> tuple[list[TagCommon], list[list[RawReading]]]:
    specs, _ = modbus_tags(1000)
    tags = [TagCommon(name=s["name"]) for s in specs]
    kinds = ["float" if s["type"] == "float32" else "int" for s in specs]
    gens = []
    for s, kind in zip(specs, kinds, strict=True):
        lo, hi = {"int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1)}.get(
            s["type"], (None, None)
        )
        gens.append(make_generator(default_spec(kind), kind, lo=lo, hi=hi))  # type: ignore[arg-type]
    out = []
    for k in range(polls):
        t = 3600.0 + 0.1 * k  # an hour into the run: counters are past their first digits
        row = []
        for tag, gen, kind in zip(tags, gens, kinds, strict=True):
            v = gen(t)
            row.append(RawReading(tag.name, _f32(float(v)) if kind == "float" else v))
        row[0] = RawReading("clock", int(1_764_000_000_000 + 100 * k) % (1 << 32))
        out.append(row)
    return tags, out


def records(tags: list[TagCommon], polls: list[list[RawReading]]) -> list[Record]:
    norm = Normalizer("plc00", tags)
    seq = SeqCounter(0)
    ts = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    out = []
    for k, readings in enumerate(polls):
        samples = norm.samples(readings, ts + timedelta(milliseconds=100 * k), seq)
        batch = encode_batch(samples, seq.last - len(samples))
        out.append(
            Record(
                k + 1,
                "plc00",
                batch.first_seq,
                batch.last_seq,
                batch.count,
                0.0,
                batch.full,  # dictionary + body: what the buffer's take() hands out
                epoch="3f2a9c0d4b5e6f708192a3b4c5d6e7f8",
            )
        )
    return out


def encoder(layout: str) -> PayloadEncoder:
    if layout == "sparkplug":
        mqtt = MqttConfig.model_validate({"layout": "sparkplug", "sparkplug": {"group_id": "g"}})
        return PayloadEncoder(AGENT, mqtt, sparkplug=SparkplugNode(AGENT, mqtt))
    return PayloadEncoder(AGENT, MqttConfig(layout=layout))  # type: ignore[arg-type]


def measure(layout: str, recs: list[Record]) -> dict[str, Any]:
    enc = encoder(layout)
    once = steady = values = 0
    for k, rec in enumerate(recs):
        pre = enc.preamble(rec)
        messages = enc.encode(rec)
        births = [m for m in messages if "BIRTH" in m.topic]
        data = [m for m in messages if m not in births]
        once += sum(packet_size(m) for m in pre + births)
        if k:  # the first poll pays for births / metadata; steady state after it
            steady += sum(packet_size(m) for m in data)
            values += rec.count
    out: dict[str, Any] = {
        "bytes_per_value": round(steady / values, 2),
        "once_bytes": once,
    }
    for limit in LIMITS:
        fwd = Forwarder(MemoryBuffer(BufferConfig(kind="memory")), FakePublisher(), encoder(layout))
        counts = []
        largest = 0
        for rec in recs[:3]:
            pre = fwd._preamble(rec, limit)
            parts = fwd._encode_fitting(rec, False, (), limit)
            messages = [m for p in parts for m in p.messages if "BIRTH" not in m.topic]
            assert all(p.poison is None for p in parts)
            counts.append(len(messages))
            largest = max([largest, *(packet_size(m) for m in pre + messages)])
            assert largest <= limit
        out[f"messages_per_record_{limit // 1024}k"] = max(counts[1:])
        out[f"largest_{limit // 1024}k"] = largest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="one JSON line per row")
    args = parser.parse_args(argv)
    rows = []
    for name, make in (("uint16x1000", uint16_polls), ("mixed", mixed_polls)):
        tags, polls = make(args.polls)
        recs = records(tags, polls)
        for layout in LAYOUTS:
            rows.append({"workload": name, "layout": layout, **measure(layout, recs)})
    if args.json:
        for r in rows:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
        return 0
    head = ("workload", "layout", "B/value", "once B", "msgs/record 16 KiB", "msgs/record 128 KiB")
    table = [head] + [
        (
            r["workload"],
            r["layout"] + (" (before)" if r["layout"] == "device" else ""),
            f"{r['bytes_per_value']:.1f}",
            f"{r['once_bytes']:,}",
            str(r["messages_per_record_16k"]),
            str(r["messages_per_record_128k"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
