"""The dataset benchmarks keep working (quick runs; no speed is asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.agent_proc import ROOT


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dataset_export_bench_quick() -> None:
    out = run("bench.dataset_export", "--polls", "300", "--tags", "5")
    assert "300 messages x 5 samples = 1500 values" in out
    assert "export csv" in out
    assert "export parquet" in out
    assert "300 rows" in out


def test_parquet_libs_bench_quick() -> None:
    out = run("bench.parquet_libs", "--rows", "500")
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()[2:]}
    assert "pyarrow" in lines  # the chosen library is in the dev environment
    assert "not installed" not in lines["pyarrow"]
    assert "csv (stdlib, baseline)" in lines
