"""Which samples were seen, by their identity (agent, epoch, seq): the deduplication of
the collector and of `export`, and the seq gaps of a dataset.

Seqs of one (agent, epoch) are kept as merged closed ranges, so the state stays small
(one range per gap, not one entry per sample) and can be persisted as JSON.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any

Key = tuple[str, str]


class SeenSeqs:
    """A set of (agent, epoch, seq) stored as ranges per (agent, epoch)."""

    def __init__(self) -> None:
        # Per key: starts and ends of disjoint, non-adjacent closed ranges, sorted.
        self._starts: dict[Key, list[int]] = {}
        self._ends: dict[Key, list[int]] = {}

    def __contains__(self, item: tuple[str, str, int]) -> bool:
        agent, epoch, seq = item
        starts = self._starts.get((agent, epoch))
        if not starts:
            return False
        i = bisect.bisect_right(starts, seq) - 1
        return i >= 0 and seq <= self._ends[(agent, epoch)][i]

    def add(self, agent: str, epoch: str, seq: int) -> bool:
        """Record a seq; False when it was already there (a duplicate)."""
        key = (agent, epoch)
        starts = self._starts.setdefault(key, [])
        ends = self._ends.setdefault(key, [])
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and seq <= ends[i]:
            return False
        joins_left = i >= 0 and ends[i] == seq - 1
        joins_right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)
        return True

    def ranges(self, agent: str, epoch: str) -> list[tuple[int, int]]:
        key = (agent, epoch)
        return list(zip(self._starts.get(key, []), self._ends.get(key, []), strict=True))

    def keys(self) -> Iterator[Key]:
        return iter(sorted(self._starts))

    def gaps(self) -> list[dict[str, Any]]:
        """Missing seqs between the lowest and highest seen, per (agent, epoch):
        ``{"agent", "epoch", "first_seq", "last_seq", "count"}`` each."""
        out = []
        for agent, epoch in self.keys():
            spans = self.ranges(agent, epoch)
            for (_, end), (start, _) in itertools.pairwise(spans):
                out.append(
                    {
                        "agent": agent,
                        "epoch": epoch,
                        "first_seq": end + 1,
                        "last_seq": start - 1,
                        "count": start - end - 1,
                    }
                )
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"agent": a, "epoch": e, "ranges": [list(r) for r in self.ranges(a, e)]}
            for a, e in self.keys()
        ]

    @classmethod
    def from_json(cls, data: Any) -> SeenSeqs:
        """Inverse of `to_json`; ValueError for anything else."""
        seen = cls()
        if not isinstance(data, list):
            raise ValueError("seen seqs: not a list")
        for item in data:
            if not isinstance(item, dict):
                raise ValueError("seen seqs: an entry is not an object")
            agent, epoch, ranges = item.get("agent"), item.get("epoch"), item.get("ranges")
            if not isinstance(agent, str) or not isinstance(epoch, str):
                raise ValueError("seen seqs: agent/epoch missing")
            if not isinstance(ranges, list):
                raise ValueError("seen seqs: ranges missing")
            starts: list[int] = []
            ends: list[int] = []
            for r in ranges:
                if (
                    not isinstance(r, list)
                    or len(r) != 2
                    or not all(type(x) is int for x in r)
                    or r[0] > r[1]
                    or (ends and r[0] <= ends[-1] + 1)
                ):
                    raise ValueError(f"seen seqs: bad range {r!r}")
                starts.append(r[0])
                ends.append(r[1])
            seen._starts[(agent, epoch)] = starts
            seen._ends[(agent, epoch)] = ends
        return seen
