"""bench/modbus_links.py keeps working (quick mode; it asserts no speed)."""

from __future__ import annotations

import pytest

from bench.modbus_links import main

pytestmark = pytest.mark.integration


async def test_links_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert await main(["--seconds", "1.5", "--units", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("bus time per cycle") == 4
    assert "dead unit:" in out
