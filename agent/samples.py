"""The samples of one poll of one device, by columns: what the normaliser hands the buffer.

A poll read as columns (a driver's `read_columns`) whose readings are all good becomes
one `PollSamples` instead of one dict per value: the device, the poll's tag names and
units (the same list objects from poll to poll), the values in one list, one ts_agent,
the first seq (the seqs are consecutive), and, by index, the few samples the normaliser
made bad (a NaN, an int beyond 64 bits: quality, reason, code and ``value_text``).

It is a Sequence of WireSample for every consumer (the dicts are built on access, equal
to the ones `agent.normalize.Normalizer.samples` makes), while the record encoder
(`agent.buffer.record`) reads the columns directly: no object per value between the
driver's frame and the stored record.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import overload

from agent.schema import WireSample
from drivers.base import Value


class PollSamples(Sequence[WireSample]):
    """One poll's samples by columns (see the module docstring). Read-only by contract:
    an item is a new dict at every access, so changing it changes nothing here."""

    __slots__ = (
        "device",
        "first_seq",
        "not_good",
        "tags",
        "ts_agent",
        "units",
        "value_text",
        "values",
    )

    def __init__(
        self,
        device: str,
        tags: Sequence[str],
        units: Sequence[str | None],
        values: list[Value | None],
        ts_agent: datetime,
        first_seq: int,
        not_good: dict[int, tuple[str, str | None, int | None]] | None = None,
        value_text: dict[int, str] | None = None,
    ) -> None:
        self.device = device
        self.tags = tags
        self.units = units
        self.values = values
        self.ts_agent = ts_agent
        self.first_seq = first_seq
        #: index → (quality, reason, code) of the samples that are not good.
        self.not_good: dict[int, tuple[str, str | None, int | None]] = not_good or {}
        #: index → value_text, for the samples whose value could not be published.
        self.value_text: dict[int, str] = value_text or {}

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.values) - 1

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> WireSample: ...
    @overload
    def __getitem__(self, index: slice) -> list[WireSample]: ...
    def __getitem__(self, index: int | slice) -> WireSample | list[WireSample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self.values)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("PollSamples index out of range")
        quality, reason, code = self.not_good.get(index, ("good", None, None))
        sample: WireSample = {
            "device": self.device,
            "tag": self.tags[index],
            "value": self.values[index],
            "quality": quality,  # type: ignore[typeddict-item]
            "reason": reason,
            "code": code,
            "ts_source": None,
            "ts_agent": self.ts_agent,
            "unit": self.units[index],
            "seq": self.first_seq + index,
        }
        text = self.value_text.get(index)
        if text is not None:
            sample["value_text"] = text
        return sample

    def __repr__(self) -> str:
        return (
            f"PollSamples({self.device!r}, {len(self)} samples, "
            f"seq {self.first_seq}..{self.last_seq}, {len(self.not_good)} not good)"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def index_of(self) -> dict[str, int]:
        """tag → its index (the last one, should a tag be read twice)."""
        return {t: i for i, t in enumerate(self.tags)}
