"""Which Parquet library for `edge-agent export`: import time, memory and write speed.

    python -m bench.parquet_libs [--rows N] [--python PYTHON]

Each candidate runs in a fresh interpreter (`--python`, default this one; point it at a
virtualenv that has the libraries installed) and writes the same wide table the exporter
writes: a timestamp column, N rows × 20 float columns and 20 quality columns built from
plain Python lists (the exporter's columns are Python lists), i.e. N × 20 values
(default N = 50,000: one million values). Printed per library: the import time, the
peak RSS after the import, the peak RSS with the columns built (the same for all), the
time to convert and write the file (building the columns is not counted), the peak RSS
after the write and the file's size. Wheel sizes are not measured here (bench/README.md
has them, from `pip download --only-binary=:all:`). A library that is not installed is
reported as such. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_COMMON = r"""
import json, resource, sys, time, os
rows = int(sys.argv[1]); out = sys.argv[2]
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
"""

_DATA = r"""
t_import = time.perf_counter() - t0
rss_import = rss_mb()
import math
cols = {"ts": [f"2026-12-01T10:{(i // 600) % 60:02d}:{(i // 10) % 60:02d}.{i % 10}00Z"
               for i in range(rows)]}
for c in range(20):
    cols[f"tag{c}"] = [math.sin(i * 0.01 + c) * 100.0 for i in range(rows)]
    cols[f"tag{c}.quality"] = ["good"] * rows
rss_data = rss_mb()
t1 = time.perf_counter()
"""

_END = r"""
t_write = time.perf_counter() - t1
print(json.dumps({"import_s": t_import, "rss_import_mb": rss_import,
                  "rss_data_mb": rss_data, "write_s": t_write,
                  "rss_peak_mb": rss_mb(), "bytes": os.path.getsize(out)}))
"""

CANDIDATES: dict[str, str] = {
    "pyarrow": r"""
import pyarrow as pa, pyarrow.parquet as pq
"""
    + _DATA
    + r"""
pq.write_table(pa.table(cols), out)
""",
    "polars": r"""
import polars as pl
"""
    + _DATA
    + r"""
pl.DataFrame(cols).write_parquet(out)
""",
    "duckdb (via CSV)": r"""
import duckdb, csv
"""
    + _DATA
    + r"""
names = list(cols)
with open(out + ".csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(names)
    w.writerows(zip(*(cols[n] for n in names)))
duckdb.sql(f"COPY (SELECT * FROM read_csv('{out}.csv', header=true)) TO '{out}' (FORMAT parquet)")
""",
    "fastparquet (+pandas)": r"""
import pandas as pd, fastparquet
"""
    + _DATA
    + r"""
fastparquet.write(out, pd.DataFrame(cols))
""",
    "csv (stdlib, baseline)": r"""
import csv
"""
    + _DATA
    + r"""
names = list(cols)
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(names)
    w.writerows(zip(*(cols[n] for n in names)))
""",
}


def measure(python: str, name: str, rows: int, out: Path) -> dict[str, float] | str:
    code = _COMMON + CANDIDATES[name] + _END
    proc = subprocess.run(
        [python, "-c", code, str(rows), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return "not installed" if "ModuleNotFoundError" in last else last
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    print(f"{args.rows} rows x 20 float columns (+20 quality columns, 1 timestamp column)")
    print(
        f"{'library':24} {'import s':>9} {'RSS import MB':>14} {'write s':>8} "
        f"{'RSS data MB':>12} {'RSS peak MB':>12} {'file MB':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(CANDIDATES):
            r = measure(args.python, name, args.rows, Path(tmp) / f"out{i}")
            if isinstance(r, str):
                print(f"{name:24} {r}")
                continue
            print(
                f"{name:24} {r['import_s']:9.3f} {r['rss_import_mb']:14.1f} {r['write_s']:8.2f} "
                f"{r['rss_data_mb']:12.1f} {r['rss_peak_mb']:12.1f} {r['bytes'] / 1e6:8.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
