"""A `Table` → a CSV or Parquet file and its sidecar, never a half-written file.

Each file is written under a temporary name in the same folder (``.NAME.tmp``), flushed
to disk, then renamed: a reader sees either the complete file or none. A failed write
(disk full, permission) removes the temporary file and raises WriteError naming the
path; an existing file of that name is left as it was.

- CSV (stdlib): a header row of column names; values as written by the agent (numbers,
  True/False, text), lists and structures as JSON text, empty cells for no value.
- Parquet (pyarrow, the optional extra ``edge-agent[parquet]``): typed columns — ``ts``
  as timestamp (µs, UTC), bool, int64, float64 (a column mixing ints and floats), string
  (text, and lists/structures as JSON text).
- Sidecar ``NAME.meta.json``: shape, columns, units per column, row and sample counts,
  duplicates dropped, seq gaps and cycle gaps.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from agent.dataset.shapes import QUALITY_SUFFIX, Table

Format = Literal["csv", "parquet"]

_TIME_COLUMNS = frozenset({"ts", "window_start"})


class WriteError(OSError):
    """A dataset file could not be written; nothing was left under its name."""


class ParquetUnavailable(RuntimeError):
    """pyarrow is not installed."""


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def write(table: Table, path: Path, fmt: Format) -> list[Path]:
    """Write `table` to `path` in `fmt`, and its sidecar; returns the paths written."""
    if fmt == "parquet":
        body = _parquet_bytes(table)
        _atomic(path, lambda f: f.write(body))
    else:
        _atomic(path, lambda f: _csv(table, f))
    meta = orjson.dumps(_meta(table, path, fmt), option=orjson.OPT_INDENT_2) + b"\n"
    side = sidecar_path(path)
    _atomic(side, lambda f: f.write(meta))
    return [path, side]


def _atomic(path: Path, fill: Callable[[IO[bytes]], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # the rename itself survives a power cut
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return value


def _csv(table: Table, f: IO[bytes]) -> None:
    text = io.TextIOWrapper(f, encoding="utf-8", newline="", write_through=False)
    try:
        w = csv.writer(text)
        w.writerow(table.columns)
        cols = table.columns
        for row in table.rows:
            w.writerow([_cell(row.get(c)) for c in cols])
        text.flush()
    finally:
        text.detach()


def _meta(table: Table, path: Path, fmt: Format) -> dict[str, Any]:
    return {
        "file": path.name,
        "format": fmt,
        "shape": table.shape,
        "rows": len(table.rows),
        "samples": table.samples,
        "duplicates_dropped": table.duplicates,
        "duplicate_cycles_dropped": table.duplicate_cycles,
        "columns": [
            {"name": c, **({"unit": table.units[c]} if c in table.units else {})}
            for c in table.columns
        ],
        "units": table.units,
        "seq_gaps": table.seq_gaps,
        "cycle_gaps": table.cycle_gaps,
    }


def _parquet_bytes(table: Table) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetUnavailable(
            "Parquet needs pyarrow: pip install 'edge-agent[parquet]' (or use --format csv)"
        ) from None
    arrays: dict[str, Any] = {}
    for c in table.columns:
        values = [row.get(c) for row in table.rows]
        arrays[c] = _array(pa, c, values)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays), sink)
    return bytes(sink.getvalue().to_pybytes())


def _array(pa: Any, column: str, values: list[Any]) -> Any:
    if column in _TIME_COLUMNS:
        return pa.array(
            [None if v is None else datetime.fromisoformat(v) for v in values],
            type=pa.timestamp("us", tz="UTC"),
        )
    if column.endswith(QUALITY_SUFFIX) or column == "device":
        return pa.array(values, type=pa.string())
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return pa.array(values, type=pa.bool_())
    if kinds == {int}:
        if all(-(2**63) <= v < 2**63 for v in values if v is not None):
            return pa.array(values, type=pa.int64())
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())
    if kinds and kinds <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    if kinds == {str}:
        return pa.array(values, type=pa.string())
    return pa.array(
        [
            None if v is None else (v if isinstance(v, str) else orjson.dumps(v).decode())
            for v in values
        ],
        type=pa.string(),
    )
