"""agent.runtime.eventloop and `edge-agent run --event-loop`: which loop runs the agent."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from types import ModuleType

import pytest

from agent import cli
from agent.runtime import eventloop
from agent.runtime.eventloop import EventLoopUnavailable, loop_factory


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> ModuleType:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_asyncio_never_imports_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str, package: str | None = None) -> ModuleType:
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(importlib, "import_module", refuse)
    assert loop_factory("asyncio") == (None, "asyncio")


def test_auto_without_uvloop_is_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    assert loop_factory("auto") == (None, "asyncio")


def test_uvloop_asked_for_but_missing_is_refused_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    with pytest.raises(EventLoopUnavailable) as raised:
        loop_factory("uvloop")
    assert str(raised.value) == (
        "--event-loop uvloop: uvloop is not installed (No module named 'uvloop'); install "
        "it with pip install 'edge-agent[uvloop]', or use --event-loop asyncio"
    )


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_uvloop_when_installed(choice: eventloop.EventLoopChoice) -> None:
    uvloop = pytest.importorskip("uvloop")
    factory, name = loop_factory(choice)
    assert factory is not None
    assert name == f"uvloop {uvloop.__version__}"

    async def kind() -> type:
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(kind()) is uvloop.Loop


def test_run_refuses_a_missing_uvloop_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _without_uvloop(monkeypatch)
    started: list[object] = []

    def run_async(*args: object, **kwargs: object) -> int:
        started.append(args)
        return 0

    monkeypatch.setattr(cli, "_run_async", run_async)
    config = Path(__file__).parents[2] / "configs" / "demo-plant.yaml"
    # Not cli.main: it sets up logging on this test's captured stderr for later tests.
    args = cli.build_parser().parse_args(["run", str(config), "--event-loop", "uvloop"])
    assert cli.cmd_run(args) == cli.EXIT_CONFIG
    assert not started
    assert "uvloop is not installed" in capsys.readouterr().err


def test_run_defaults_to_asyncio() -> None:
    args = cli.build_parser().parse_args(["run", "x.yaml"])
    assert args.event_loop == "asyncio"
