"""Prototype measurement: CPU per value of the steps between a Modbus poll's columns and
the bytes stored and sent, for one modbus-wide poll (1,000 good values: int16, float32,
int32), in-process, `time.process_time`, best of 5.

    .venv/bin/python -m bench.proto_encode_costs

Measures what this tree has: the normaliser (Columns → one sample dict per value),
`encode_batch`, and, when present (branches `record` and `layouts` of issue 11),
`agent.buffer.record.RecordEncoder.encode` and `agent.layouts.lean.encode` after
`record_samples`. Pure CPU, no I/O: what each step costs per value at most.
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.buffer.common import encode_batch, record_samples
from agent.normalize import Columns, Normalizer, SeqCounter
from bench.scenarios import SCENARIOS, modbus_devices
from drivers.modbus.config import ModbusDevice

N_RUNS = 5


def best(step: Callable[[], object], values: int, repeat: int = 200) -> float:
    """µs CPU per value, the best of N_RUNS runs of `repeat` calls."""
    runs = []
    for _ in range(N_RUNS):
        t0 = time.process_time()
        for _ in range(repeat):
            step()
        runs.append((time.process_time() - t0) / repeat / values * 1e6)
    return min(runs)


def optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def main() -> None:
    device = ModbusDevice.model_validate(modbus_devices(SCENARIOS["modbus-wide"], None)[0])
    rng = random.Random(11)
    names = [t.name for t in device.tags]
    values: list[Any] = [
        rng.randint(-30000, 30000) if t.type in ("int16", "int32", "uint32") else rng.random()
        for t in device.tags
    ]
    n = len(values)
    norm = Normalizer(device.name, device.tags)
    seq = SeqCounter(0)

    def normalize() -> list[Any]:
        return norm.samples(Columns(names, list(values), {}), datetime.now(UTC), seq)

    samples = normalize()
    first = samples[0]["seq"]
    print(f"normalize (Columns -> {n} sample dicts): {best(normalize, n):.3f} µs/value")
    print(f"encode_batch: {best(lambda: encode_batch(samples, first - 1), n):.3f} µs/value")
    data = encode_batch(samples, first - 1).data
    record = optional("agent.buffer.record")
    if record is not None and hasattr(record, "RecordEncoder"):
        encoder = record.RecordEncoder()
        encoded = encoder.encode(samples, first - 1)
        cost = best(lambda: encoder.encode(samples, first - 1), n)
        print(f"record: RecordEncoder.encode (dicts -> record): {cost:.3f} µs/value")
        whole = getattr(encoded, "full", encoded.data)  # the record with its dictionary
        data = whole() if callable(whole) else whole
    print(f"record_samples (stored -> dicts): {best(lambda: record_samples(data), n):.3f} µs/value")
    lean = optional("agent.layouts.lean")
    if lean is not None:
        decoded = record_samples(data)
        head = {"schema": lean.SCHEMA, "agent": "bench"}
        epoch = "e" * 32

        def lean_encode() -> bytes:
            payload: bytes = lean.encode(
                head, device.name, epoch, decoded, historical=False, gaps=()
            )
            return payload

        size = len(lean_encode())
        cost = best(lean_encode, n)
        print(
            f"layouts: lean.encode (dicts -> payload): {cost:.3f} µs/value, {size / n:.1f} B/value"
        )
    compact = optional("agent.layouts.compact")
    if compact is not None:
        decoded = record_samples(data)
        mapping = compact.Mapping()
        mapping.update(decoded)
        chead = {"schema": compact.SCHEMA, "agent": "bench"}

        def compact_encode() -> bytes:
            payload: bytes = compact.encode(
                chead, device.name, "e" * 32, mapping, decoded, historical=False, gaps=()
            )
            return payload

        size = len(compact_encode())
        cost = best(compact_encode, n)
        print(
            f"layouts: compact.encode (dicts -> payload): {cost:.3f} µs/value, "
            f"{size / n:.1f} B/value (plus record_samples)"
        )
    # The columnar path (agent.samples.PollSamples): what the writer and the lean layout
    # do now, beside the dict path above, in the same run.
    if hasattr(norm, "batch"):
        seq2 = SeqCounter(0)

        def batch() -> Any:
            return norm.batch(Columns(names, list(values), {}), datetime.now(UTC), seq2)

        poll = batch()
        print(f"columns: Normalizer.batch (Columns -> PollSamples): {best(batch, n):.3f} µs/value")
        enc2 = record.RecordEncoder()
        last = poll.first_seq - 1
        cost = best(lambda: enc2.encode(poll, last), n)
        print(f"columns: RecordEncoder.encode (PollSamples -> record): {cost:.3f} µs/value")
        full = enc2.encode(poll, last).full
        head = {"schema": lean.SCHEMA, "agent": "bench"}

        def lean_columns() -> bytes:
            cols = record.record_columns(full)
            out: bytes = lean.encode_columns(
                head, device.name, "e" * 32, cols, historical=False, gaps=()
            )
            return out

        if compact is not None:
            cmap = compact.Mapping()
            cols0 = record.record_columns(full)
            cmap.update_columns(cols0.tags, cols0.units, cols0.values)
            chead2 = {"schema": compact.SCHEMA, "agent": "bench"}

            def compact_columns() -> bytes:
                cols = record.record_columns(full)
                cmap.update_columns(cols.tags, cols.units, cols.values)
                out: bytes = compact.encode_columns(
                    chead2, device.name, "e" * 32, cmap, cols, historical=False, gaps=()
                )
                return out

            cost = best(compact_columns, n)
            print(
                f"columns: record_columns + compact.encode_columns (stored -> payload): "
                f"{cost:.3f} µs/value"
            )
        cost = best(lean_columns, n)
        print(
            f"columns: record_columns + lean.encode_columns (stored -> payload): "
            f"{cost:.3f} µs/value"
        )
        dicts_total = sum(
            best(f, n)
            for f in (
                normalize,
                lambda: encoder.encode(samples, first - 1),
                lambda: lean.encode(
                    head, device.name, "e" * 32, record_samples(data), historical=False, gaps=()
                ),
            )
        )
        cols_total = sum(best(f, n) for f in (batch, lambda: enc2.encode(poll, last), lean_columns))
        print(
            f"total normalize + store encode + decode + lean: dicts {dicts_total:.3f}, "
            f"columns {cols_total:.3f} µs/value"
        )


if __name__ == "__main__":
    main()
