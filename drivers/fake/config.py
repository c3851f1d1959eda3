"""Configuration of a fake device (the `protocol: fake` entries).

The fake protocol is registered only where it is wanted (tests, demos of the registry):
`drivers.registry.register(FakeBench().protocol())`. Its devices live at an endpoint
`fake://NAME` inside the agent's process; simulator mode serves them there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drivers.base import DeviceCommon, TagCommon

FakeType = Literal["bool", "int", "float", "str"]


class FakeTag(TagCommon):
    """A fake tag: a value of one type, from the simulator's generator or the script."""

    type: FakeType = Field(default="float", description="Type of the value.")
    read_only: bool = Field(
        default=False, description="The fake device refuses writes to this tag."
    )

    @property
    def write_type(self) -> str:
        """The raw type of writes (agent.command.convert's names)."""
        return {"bool": "bool", "int": "int64", "float": "float64", "str": "string"}[self.type]


class FakeDevice(DeviceCommon):
    """A fake device, served inside the agent's process."""

    protocol: Literal["fake"] = Field(description="Always 'fake'.")
    endpoint: str = Field(
        default="fake://local",
        pattern=r"^fake://[A-Za-z0-9_.\-]+$",
        description="Where the device is served: fake://NAME (devices may share one).",
    )
    tags: list[FakeTag] = Field(min_length=1, description="The values to read.")

    def write_refusal(self, tag: str) -> str | None:
        for t in self.tags:
            if t.name == tag:
                return "the tag is read_only" if t.read_only else None
        return f"no tag {tag!r}"
