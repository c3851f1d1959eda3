"""The fake protocol: a scriptable driver and an in-process simulator, for tests.

Not one of the built-in protocols: a test (or a demo of the registry) registers it,
bound to a `FakeBench` of its own:

    from drivers import registry
    from drivers.fake import FakeBench

    bench = FakeBench()
    with registry.registered(bench.protocol()):
        ...

`PROTOCOL` (bound to `DEFAULT_BENCH`) is what an entry point would name.
"""

from __future__ import annotations

from drivers.fake.bench import FakeBench, format_plan
from drivers.fake.config import FakeDevice, FakeTag
from drivers.fake.driver import Call, FakeDriver, FakeLink, FakeScript, Step
from drivers.fake.simulator import FakeNetwork, FakeServer, FakeSimulator

DEFAULT_BENCH = FakeBench()
PROTOCOL = DEFAULT_BENCH.protocol()

__all__ = [
    "DEFAULT_BENCH",
    "PROTOCOL",
    "Call",
    "FakeBench",
    "FakeDevice",
    "FakeDriver",
    "FakeLink",
    "FakeNetwork",
    "FakeScript",
    "FakeServer",
    "FakeSimulator",
    "FakeTag",
    "Step",
    "format_plan",
]
