"""The status page in a real headless browser (Debian's chromium) against the real agent
in simulator mode: the page shows the simulated devices, and their values change."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess
from tests.support.broker import MosquittoBroker, free_port
from tests.support.http import sim_config, wait_ready

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> str:
    """The chromium binary; skips when missing (fails under CI=true, which installs it)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must install it", pytrace=False)
    pytest.skip(reason)


def dump_dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its script ran (chromium's virtual time lets the fetch finish)."""
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class TagValues(HTMLParser):
    """Collects {device/tag: (value text, quality text)} from the page's tag tables."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[str]] = {}
        self.devices: list[str] = []
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        row = a.get("data-tag")
        if tag == "tr" and row:
            self._row = row
            self.values[row] = []
        elif tag == "h3" and a.get("data-device"):
            self.devices.append(str(a["data-device"]))
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self.values[self._row].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(dom: str) -> TagValues:
    parser = TagValues()
    parser.feed(dom)
    return parser


def test_status_page_shows_changing_simulated_values(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    chromium = require_chromium()
    http_port = free_port()
    config = sim_config(tmp_path, broker.port, http_port)
    url = f"http://127.0.0.1:{http_port}/"
    with AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent:
        wait_ready(f"http://127.0.0.1:{http_port}", agent)
        first = parse(dump_dom(chromium, url, tmp_path / "profile-1"))
        assert first.devices == ["press-1", "oven"]
        assert set(first.values) == {"press-1/power_kw", "press-1/strokes", "oven/temperature"}
        # columns: tag, value, unit, quality, age
        assert first.values["press-1/power_kw"][2] == "kW"
        assert first.values["press-1/power_kw"][3] == "good"
        assert re.fullmatch(r"-?\d+(\.\d+)?", first.values["press-1/power_kw"][1])
        deadline = time.monotonic() + 60
        while True:
            time.sleep(1)
            again = parse(dump_dom(chromium, url, tmp_path / "profile-2"))
            if again.values["press-1/strokes"][1] != first.values["press-1/strokes"][1]:
                break
            assert time.monotonic() < deadline, "the page's values did not change"
        assert int(again.values["press-1/strokes"][1]) > int(first.values["press-1/strokes"][1])
        assert agent.terminate() == 0
