"""Prototype measurement: CPU per value of the per-poll hot path between the Modbus
response and the buffer row, as it is and as the profile suggests it could be.

    .venv/bin/python -m bench.proto_normalize

For one poll of 1,000 good values (the modbus-wide device):
- `current`: a `RawReading` per value (as `ModbusDriver._fill` builds them), then
  `Normalizer.samples` and `encode_batch` (seq check + orjson), the code the agent runs;
- `columnar`: the driver hands over the decoded values as one list aligned with the
  plan's tags (no per-value object), the normalizer builds the sample dicts in one
  comprehension for an all-good poll without scaling, and orjson encodes them (seqs are
  consecutive by construction, so the per-sample check goes);
- `columnar+ts`: the same with `ts_agent` formatted once per poll instead of by orjson
  per sample;
- `agent-columns`: what the agent runs now for a Modbus poll: `Columns` (the driver's
  `read_columns`), `Normalizer.samples` (its all-good path) and `encode_batch` (its
  consecutive-seq check).
Pure CPU, single thread, no I/O: it bounds what the change can save per value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from agent.buffer.common import encode_batch
from agent.normalize import Columns, Normalizer, SeqCounter
from drivers.base import RawReading, TagCommon

N = 1000
TAGS = [TagCommon(name=f"t{i:04d}") for i in range(N)]
VALUES: list[float | int] = [float(i) * 1.5 if i % 3 else i for i in range(N)]


def current(norm: Normalizer, seq: SeqCounter) -> bytes:
    readings = [RawReading(t.name, v) for t, v in zip(TAGS, VALUES, strict=True)]
    samples = norm.samples(readings, datetime.now(UTC), seq)
    return encode_batch(samples, samples[0]["seq"] - 1).data


def agent_columns(norm: Normalizer, seq: SeqCounter) -> bytes:
    samples = norm.samples(Columns(NAMES, list(VALUES), {}), datetime.now(UTC), seq)
    return encode_batch(samples, samples[0]["seq"] - 1).data


NAMES = [t.name for t in TAGS]
UNITS = [t.unit for t in TAGS]


def columnar(norm: Normalizer, seq: SeqCounter, *, ts_text: bool = False) -> bytes:
    first = seq.take(N)
    now = datetime.now(UTC)
    ts: object = now.isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts_text else now
    samples = [
        {
            "device": "plc00",
            "tag": tag,
            "value": value,
            "quality": "good",
            "reason": None,
            "code": None,
            "ts_source": None,
            "ts_agent": ts,
            "unit": unit,
            "seq": first + i,
        }
        for i, (tag, value, unit) in enumerate(zip(NAMES, VALUES, UNITS, strict=True))
    ]
    return orjson.dumps(samples, option=orjson.OPT_UTC_Z)


def measure(name: str, fn: Callable[[], bytes], seconds: float = 2.0) -> float:
    fn()
    n = 0
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        fn()
        n += 1
    us = (time.process_time() - t0) / (n * N) * 1e6
    print(f"{name:<14}{us:8.3f} µs CPU per value ({len(fn())} bytes per poll)")
    return us


def main() -> None:
    norm = Normalizer("plc00", TAGS)
    seq = SeqCounter(0)
    a = measure("current", lambda: current(norm, seq))
    b = measure("columnar", lambda: columnar(norm, seq))
    c = measure("columnar+ts", lambda: columnar(norm, seq, ts_text=True))
    d = measure("agent-columns", lambda: agent_columns(norm, seq))
    print(f"saving: {a - b:.3f} / {a - c:.3f} µs per value = {(a - c) / a:.0%} of this path")
    print(f"agent now: {a - d:.3f} µs per value saved = {(a - d) / a:.0%} of this path")


if __name__ == "__main__":
    main()
