"""Report by exception on a realistic mix: messages and bytes saved, and a consumer's
reconstruction against the raw series.

    .venv/bin/python -m bench.derive_rbe            # 1 simulated hour
    .venv/bin/python -m bench.derive_rbe --quick    # 10 simulated minutes

Then the same for window features: the press of the KAMP dataset (vibration and motor
current at 10 Hz) published raw, or as 1 s windows of mean, std, RMS, min and max.

One device polled every second (simulated time: no sleeping), 50 tags:

- 20 temperatures: a slow random walk (±0.02 degC/s) with sensor noise (σ 0.03 degC),
  read as int16 in tenths (resolution 0.1 degC); `deadband_abs: 0.2`;
- 10 pressures: 100 bar ± a slow process swing (±3 bar, period 10 min) with noise
  σ 0.4 bar; `deadband_pct: 1` (≈ 1 bar);
- 5 counters: a shot counter (+1 every 7 s), 4 piece counters (+1 every 20-60 s);
  on change;
- 15 status bits: each flips at random, on average every 5 minutes; on change;
- every tag: `max_interval_s: 60` (heartbeat), and a 30 s outage of the device in the
  middle (all tags bad, then good again: transitions always go out).

Each poll goes through the real normaliser and the derive stage, is numbered, encoded
as the buffer stores it and then as the `device` layout (one message per poll with
anything to send) and the `tag` layout (one message per sample) publish it, with and
without report by exception. The reconstruction check holds the last published value
of each tag (sample and hold, repeats included) and compares it with every raw reading:
the largest error per class, against the band. Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.buffer import Record
from agent.buffer.common import encode_batch
from agent.config import AgentSection, MqttConfig
from agent.derive.config import ReportConfig, WindowConfig
from agent.derive.report import ExceptionFilter
from agent.derive.windows import Window
from agent.normalize import Normalizer, SeqCounter
from agent.payload import PayloadEncoder
from agent.schema import WireSample
from drivers.base import RawReading, TagCommon

T0 = datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
HEARTBEAT_S = 60.0


@dataclass
class Signal:
    name: str
    kind: str  # temperature | pressure | counter | status
    report: ReportConfig
    state: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def make_signals(rng: random.Random) -> list[Signal]:
    out: list[Signal] = []
    for i in range(20):
        out.append(
            Signal(
                f"temp_{i:02d}",
                "temperature",
                ReportConfig(deadband_abs=0.2, max_interval_s=HEARTBEAT_S),
                state=rng.uniform(40, 220),
            )
        )
    for i in range(10):
        out.append(
            Signal(
                f"pressure_{i:02d}",
                "pressure",
                ReportConfig(deadband_pct=1.0, max_interval_s=HEARTBEAT_S),
                state=100.0,
                extra={"phase": rng.uniform(0, 2 * math.pi)},
            )
        )
    for i, period in enumerate([7, 20, 30, 45, 60]):
        out.append(
            Signal(
                f"count_{i}",
                "counter",
                ReportConfig(max_interval_s=HEARTBEAT_S),
                state=float(rng.randint(0, 100000)),
                extra={"period": period, "offset": rng.uniform(0, period)},
            )
        )
    for i in range(15):
        out.append(
            Signal(
                f"status_{i:02d}",
                "status",
                ReportConfig(max_interval_s=HEARTBEAT_S),
                state=float(rng.random() < 0.5),
            )
        )
    return out


def read(sig: Signal, t: float, rng: random.Random) -> bool | int | float:
    if sig.kind == "temperature":
        sig.state += rng.uniform(-0.02, 0.02)
        return round((sig.state + rng.gauss(0, 0.03)) * 10)  # int16 tenths, scale 0.1
    if sig.kind == "pressure":
        swing = 3 * math.sin(2 * math.pi * t / 600 + sig.extra["phase"])
        return sig.state + swing + rng.gauss(0, 0.4)
    if sig.kind == "counter":
        return int(sig.state + (t + sig.extra["offset"]) // sig.extra["period"])
    if rng.random() < 1 / 300:
        sig.state = 1.0 - sig.state
    return sig.state >= 0.5


def band(sig: Signal, value: float) -> float:
    r = sig.report
    return max(r.deadband_abs or 0.0, (r.deadband_pct or 0.0) / 100 * abs(value))


@dataclass
class Wire:
    """What one stream costs on the wire."""

    samples: int = 0
    device_messages: int = 0
    device_bytes: int = 0
    tag_messages: int = 0
    tag_bytes: int = 0


def publish(
    encoders: tuple[PayloadEncoder, PayloadEncoder], samples: list[WireSample], w: Wire
) -> None:
    if not samples:
        return
    batch = encode_batch(samples, samples[0]["seq"] - 1)
    # `full`: dictionary + body, a record as the buffer's take() hands it out.
    record = Record(0, "line", batch.first_seq, batch.last_seq, batch.count, 0.0, batch.full)
    device, tag = encoders
    w.samples += len(samples)
    for m in device.encode(record):
        w.device_messages += 1
        w.device_bytes += len(m.payload) + len(m.topic)
    for m in tag.encode(record):
        w.tag_messages += 1
        w.tag_bytes += len(m.payload) + len(m.topic)


def run(seconds: int, seed: int = 14) -> dict[str, Any]:
    rng = random.Random(seed)
    signals = make_signals(rng)
    tags = [
        TagCommon(
            name=s.name, unit={"temperature": "degC", "pressure": "bar"}.get(s.kind), scale=0.1
        )
        if s.kind == "temperature"
        else TagCommon(name=s.name, unit="bar" if s.kind == "pressure" else None)
        for s in signals
    ]
    norm = Normalizer("line", tags)
    filt = ExceptionFilter({s.name: s.report for s in signals})
    agent = AgentSection(id="gw-bench")
    encoders = {
        layout: PayloadEncoder(agent, MqttConfig.model_validate({"layout": layout}), epoch="e" * 32)
        for layout in ("device", "tag")
    }
    pair = (encoders["device"], encoders["tag"])
    raw_wire, rbe_wire = Wire(), Wire()
    raw_seq, rbe_seq = SeqCounter(0), SeqCounter(0)
    held: dict[str, WireSample] = {}
    worst: dict[str, float] = {}  # kind → largest |raw - held| / band (or error, no band)
    wrong_quality = 0
    outage = range(seconds // 2, seconds // 2 + 30)
    cpu = 0.0
    for t in range(seconds):
        ts = T0 + timedelta(seconds=t)
        if t in outage:
            readings = [RawReading(s.name, None, "bad", "timeout") for s in signals]
        else:
            readings = [RawReading(s.name, read(s, float(t), rng)) for s in signals]
        samples = norm.samples(readings, ts, raw_seq)
        publish(pair, samples, raw_wire)
        scratch = norm.samples(readings, ts, SeqCounter(0))
        started = time.process_time()
        out = filt.filter(scratch, float(t))
        cpu += time.process_time() - started
        first = rbe_seq.take(len(out))
        for i, s in enumerate(out):
            s["seq"] = first + i
            held[s["tag"]] = s
        publish(pair, out, rbe_wire)
        for sig, raw in zip(signals, samples, strict=True):
            h = held[sig.name]
            if h["quality"] != raw["quality"]:
                wrong_quality += 1
                continue
            if raw["value"] is None:
                continue
            err = abs(float(raw["value"]) - float(h["value"]))  # type: ignore[arg-type]
            b = band(sig, float(h["value"]))  # type: ignore[arg-type]
            ratio = err / b if b > 0 else err
            worst[sig.kind] = max(worst.get(sig.kind, 0.0), ratio)
    result = {
        "scenario": "derive-rbe",
        "simulated_s": seconds,
        "tags": len(signals),
        "raw_samples": raw_wire.samples,
        "rbe_samples": rbe_wire.samples,
        "repeats": filt.repeats,
        "sample_reduction": round(raw_wire.samples / rbe_wire.samples, 2),
        "device_messages": [raw_wire.device_messages, rbe_wire.device_messages],
        "device_bytes": [raw_wire.device_bytes, rbe_wire.device_bytes],
        "device_byte_reduction": round(raw_wire.device_bytes / rbe_wire.device_bytes, 2),
        "tag_messages": [raw_wire.tag_messages, rbe_wire.tag_messages],
        "tag_message_reduction": round(raw_wire.tag_messages / rbe_wire.tag_messages, 2),
        "tag_bytes": [raw_wire.tag_bytes, rbe_wire.tag_bytes],
        "tag_byte_reduction": round(raw_wire.tag_bytes / rbe_wire.tag_bytes, 2),
        "max_error_over_band": {k: round(v, 3) for k, v in worst.items()},
        "quality_mismatches": wrong_quality,
        "filter_cpu_us_per_sample": round(cpu / raw_wire.samples * 1e6, 3),
    }
    return result


def run_windows(seconds: int, seed: int = 14) -> dict[str, Any]:
    """The press of the KAMP dataset: vibration and motor current read at 10 Hz, published
    raw, or as 1 s windows of mean/std/rms/min/max (+ good_share) with the raw kept local."""
    rng = random.Random(seed)
    tags = [TagCommon(name="vibration_g", unit="g"), TagCommon(name="current_a", unit="A")]
    norm = Normalizer("press", tags)
    cfg = WindowConfig(
        tags=["vibration_g", "current_a"],
        length_s=1.0,
        features=["mean", "std", "rms", "min", "max"],
    )
    window = Window("press", cfg, {"vibration_g": "g", "current_a": "A"})
    agent = AgentSection(id="gw-bench")
    pair = (
        PayloadEncoder(agent, MqttConfig.model_validate({"layout": "device"}), epoch="e" * 32),
        PayloadEncoder(agent, MqttConfig.model_validate({"layout": "tag"}), epoch="e" * 32),
    )
    raw_wire, win_wire = Wire(), Wire()
    raw_seq, win_seq = SeqCounter(0), SeqCounter(0)
    cpu = 0.0
    for i in range(seconds * 10):
        t = i / 10
        ts = T0 + timedelta(seconds=t)
        vib = 0.3 * math.sin(2 * math.pi * 3.1 * t) + rng.gauss(0, 0.05)
        cur = 12.0 + 0.5 * math.sin(2 * math.pi * t / 30) + rng.gauss(0, 0.1)
        readings = [RawReading("vibration_g", vib), RawReading("current_a", cur)]
        publish(pair, norm.samples(readings, ts, raw_seq), raw_wire)
        scratch = norm.samples(readings, ts, SeqCounter(0))
        started = time.process_time()
        records = window.add(scratch, ts)
        cpu += time.process_time() - started
        for record in records:
            first = win_seq.take(len(record))
            for k, s in enumerate(record):
                s["seq"] = first + k
            publish(pair, record, win_wire)
    return {
        "scenario": "derive-windows",
        "simulated_s": seconds,
        "raw_samples": raw_wire.samples,
        "window_samples": win_wire.samples,
        "device_messages": [raw_wire.device_messages, win_wire.device_messages],
        "device_bytes": [raw_wire.device_bytes, win_wire.device_bytes],
        "tag_messages": [raw_wire.tag_messages, win_wire.tag_messages],
        "tag_bytes": [raw_wire.tag_bytes, win_wire.tag_bytes],
        "window_cpu_us_per_reading": round(cpu / raw_wire.samples * 1e6, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 simulated minutes")
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args(argv)
    seconds = args.seconds or (600 if args.quick else 3600)
    result = run(seconds)
    print(json.dumps(result))
    print(
        f"\n{result['tags']} tags × {seconds} polls (1 s), 30 s device outage, "
        f"heartbeat {HEARTBEAT_S:.0f} s"
    )
    rows = [
        ("samples", result["raw_samples"], result["rbe_samples"]),
        ("device layout: messages", *result["device_messages"]),
        ("device layout: bytes", *result["device_bytes"]),
        ("tag layout: messages", *result["tag_messages"]),
        ("tag layout: bytes", *result["tag_bytes"]),
    ]
    print(f"{'':28}{'every poll':>14}{'by exception':>14}{'factor':>9}")
    for name, a, b in rows:
        print(f"{name:28}{a:>14,}{b:>14,}{a / b:>9.2f}")
    print("largest sample-and-hold error / band (≤ 1 is within the band; counters and")
    print("bits: absolute error, 0 is exact):")
    for kind, v in result["max_error_over_band"].items():
        print(f"  {kind:12} {v}")
    print(f"quality mismatches: {result['quality_mismatches']}")
    print(f"filter CPU: {result['filter_cpu_us_per_sample']} µs per sample read")
    win = run_windows(seconds)
    print(json.dumps(win))
    print(f"\nwindows: 2 tags at 10 Hz, 1 s windows of mean/std/rms/min/max, {seconds} s")
    print(f"{'':28}{'raw':>14}{'windows':>14}{'factor':>9}")
    for name, key in (
        ("device layout: messages", "device_messages"),
        ("device layout: bytes", "device_bytes"),
        ("tag layout: messages", "tag_messages"),
        ("tag layout: bytes", "tag_bytes"),
    ):
        a, b = win[key]
        print(f"{name:28}{a:>14,}{b:>14,}{a / b:>9.2f}")
    print(f"window CPU: {win['window_cpu_us_per_reading']} µs per reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
