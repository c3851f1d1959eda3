"""The dataset tools on one million values: collector ingest, then export.

    python -m bench.dataset_export [--polls N] [--tags T]

Makes N batch messages of T samples each (default 50,000 × 20 = one million values, the
agent's own `edge-agent/batch/1` layout), hands them to a `Collector` in a temporary
folder (decode, deduplicate, write, one fsync per 1,000 messages as `edge-agent collect`
does at most), then exports the folder in the `time` shape to CSV and to Parquet, reading the files
as a stream as `edge-agent export` does. Prints the time and the peak RSS (of the
process so far: the collect step holds every message in memory) of each step. Runs in
well under a minute.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from agent.dataset.collector import Collector, data_files, read_samples
from agent.dataset.shapes import build
from agent.dataset.writers import write

T0 = datetime(2026, 12, 1, 10, tzinfo=UTC)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=50_000)
    parser.add_argument("--tags", type=int, default=20)
    args = parser.parse_args(argv)
    n = args.polls * args.tags
    head = {"schema": "edge-agent/batch/1", "agent": "gw", "epoch": "e", "device": "imm-1"}
    messages = []
    seq = 1
    for p in range(args.polls):
        ts = (T0 + timedelta(seconds=p / 10)).isoformat().replace("+00:00", "Z")
        samples = [
            {"device": "imm-1", "tag": f"tag{i}", "value": p * 0.5 + i, "quality": "good",
             "reason": None, "code": None, "ts_source": None, "ts_agent": ts, "unit": "bar",
             "seq": seq + i}
            for i in range(args.tags)
        ]  # fmt: skip
        seq += args.tags
        messages.append(orjson.dumps({**head, "samples": samples}))
    print(f"{args.polls} messages x {args.tags} samples = {n} values")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "collect"
        c = Collector(folder)
        c.open()
        t0 = time.perf_counter()
        for i, m in enumerate(messages, start=1):
            c.offer("edge/gw/imm-1", m)
            if i % 1000 == 0:
                c.flush()
        c.close()
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in data_files(folder, include_open=True))
        print(f"collect: {dt:.2f} s ({n / dt:,.0f} values/s), files {size / 1e6:.1f} MB, "
              f"peak RSS {rss_mb():.0f} MB")  # fmt: skip
        del messages
        for fmt in ("csv", "parquet"):
            t0 = time.perf_counter()
            files = data_files(folder, include_open=True)
            table = build((s for f in files for s in read_samples(f)), "time")
            t1 = time.perf_counter()
            out = Path(tmp) / f"out.{fmt}"
            write(table, out, "csv" if fmt == "csv" else "parquet")
            t2 = time.perf_counter()
            print(f"export {fmt:7}: read+shape {t1 - t0:.2f} s, write {t2 - t1:.2f} s, "
                  f"{len(table.rows)} rows, file {out.stat().st_size / 1e6:.1f} MB, "
                  f"peak RSS {rss_mb():.0f} MB")  # fmt: skip
            del table
    return 0


if __name__ == "__main__":
    sys.exit(main())
