"""bench/modbus_links.py keeps working (quick mode; it asserts no speed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


async def test_links_bench_runs() -> None:
    # A process of its own: the bench configures logging for the whole process.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "modbus_links.py"),
        "--seconds",
        "1.5",
        "--units",
        "3",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert text.count("bus time per cycle") == 4
    assert "dead unit:" in text
