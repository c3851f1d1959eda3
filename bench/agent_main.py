"""The agent's own CLI with bench-only experiments:

    python -m bench.agent_main [--forwarder-max-records N] run CONFIG

The agent has no switch for this, so this launcher builds the forwarder with another
`max_records`, to measure the difference. (The event loop has its own switch now:
`edge-agent run --event-loop asyncio|uvloop`.)
"""

from __future__ import annotations

import sys

from agent.cli import main


def run(argv: list[str]) -> int:
    while argv and argv[0].startswith("--"):
        if argv[0] == "--forwarder-max-records":
            # Experiment only: how much of the agent's RSS is the forwarder's round.
            import functools

            import agent.runtime.pipeline
            from agent.forwarder import Forwarder

            limit = int(argv[1])
            agent.runtime.pipeline.Forwarder = functools.partial(  # type: ignore[attr-defined,assignment]
                Forwarder, max_records=limit
            )
            argv = argv[2:]
        else:
            break
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
