"""The real agent process with a fault injected at one boundary (tests only).

    python -m tests.support.faulty_agent FAULT edge-agent-args...

FAULT is ``take:FIRST:COUNT`` (the SQLite buffer's `take` — the forwarder's side — raises
OSError(EIO) on COUNT calls from call FIRST on; COUNT ``inf`` never stops) or
``append_many:FIRST:COUNT`` (the buffer's `append_many` — the writer's side — returns no
results, a bug the writer cannot handle). Everything else is the real `edge-agent`.

`FaultyAgentProcess` is an AgentProcess that runs this module instead of agent.cli.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tests.support.agent_proc import ROOT, AgentProcess


def _window(spec: str) -> tuple[str, int, float]:
    name, first, count = spec.split(":")
    return name, int(first), float(count)


def install(spec: str) -> None:
    from agent.buffer.sqlite import SqliteBuffer

    name, first, count = _window(spec)
    original = getattr(SqliteBuffer, name)
    calls = 0

    async def faulty(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if first <= calls < first + count:
            if name == "take":
                raise OSError(errno.EIO, "Input/output error (injected)")
            if name == "append_many":
                return []
        return await original(self, *args, **kwargs)

    setattr(SqliteBuffer, name, faulty)


class FaultyAgentProcess(AgentProcess):
    def __init__(self, log_path: Any, fault: str, *args: str) -> None:
        super().__init__(log_path, *args)
        self.fault = fault

    def start(self) -> FaultyAgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.faulty_agent", self.fault, *self.args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
            )
        return self


def main(argv: Sequence[str]) -> int:
    install(argv[0])
    from agent.cli import main as cli_main

    return cli_main(list(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
