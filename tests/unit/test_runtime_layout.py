"""The runtime package: its old public names still import from `agent.runtime`, and each
module imports on its own first (no import cycle between the runtime and the HTTP layer)."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "agent.http.server",
    "agent.http.metrics",
    "agent.runtime.snapshot",
    "agent.runtime.supervisor",
    "agent.runtime.writer",
    "agent.runtime.reload",
    "agent.runtime.signals",
    "agent.runtime.pipeline",
]


def test_the_public_names_stay_importable() -> None:
    from agent.runtime import (  # noqa: F401
        WRITE_BATCH_MAX,
        WRITE_QUEUE_MAX,
        Agent,
        AgentStatus,
        RateHistory,
        ReloadResult,
        drain_eta,
        make_driver,
        run_until_signal,
        wait_for_signal,
    )


def test_each_module_imports_first() -> None:
    # One child process; each module is imported first after forgetting the project's
    # modules, which is when an import cycle shows.
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('agent', 'drivers')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
