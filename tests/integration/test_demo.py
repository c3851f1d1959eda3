"""The README's first command, as a new user runs it: live samples from 3 devices."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_demo_shows_live_samples_from_three_devices() -> None:
    result = subprocess.run(
        ["scripts/demo"],
        cwd=ROOT,
        env={**os.environ, "DEMO_SECONDS": "15"},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"^seq\s+(\d+)\s+([\w.-]+)/(\w+) = .*\[(\w+)", result.stdout, re.M)
    devices = {device for _, device, _, _ in lines}
    assert devices == {"press-1", "oven-ctrl", "packer-2"}, result.stdout[-2000:]
    assert {quality for *_, quality in lines} == {"good"}
    assert "status page http://127.0.0.1:" in result.stderr
