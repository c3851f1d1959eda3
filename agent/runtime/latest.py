"""The newest sample of every tag of one device (the status page, snapshots, Sparkplug
births), kept without a write per value.

The writer stores a poll that came by columns (`agent.samples.PollSamples`) as one entry
per poll group (its tag list), and any other sample as itself; a lookup takes the newest
of the entries that hold the tag. So the hot path costs one dict write per poll, not one
per value, and a tag's sample dict is built when somebody asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from agent.samples import PollSamples
from agent.schema import WireSample

#: Poll groups (distinct tag lists) remembered per device; beyond, the oldest is dropped
#: (its tags then show the newest single sample, if any). A driver keeps one list per
#: group, so this is only reached by one that makes a new list every poll.
_POLLS_MAX = 32


class LatestSamples(MutableMapping[str, WireSample]):
    """tag → its newest sample. `put_poll` records a whole poll in O(1) (plus its tag
    index the first time a tag list is seen); `put` / item assignment record one sample."""

    def __init__(self) -> None:
        self._n = 0
        self._single: dict[str, tuple[int, WireSample]] = {}
        # id(tags) → (order, poll, tag → index)
        self._polls: dict[int, tuple[int, PollSamples, dict[str, int]]] = {}

    def put_poll(self, poll: PollSamples) -> None:
        self._n += 1
        key = id(poll.tags)
        cur = self._polls.get(key)
        if cur is not None and cur[1].tags is poll.tags:
            index = cur[2]
        else:
            index = poll.index_of()
            # Another list object with the same tags replaces its entry (a driver that
            # builds the list anew); the oldest goes when too many are kept.
            for k, (_, old, _) in list(self._polls.items()):
                if old.tags == poll.tags:
                    del self._polls[k]
            if len(self._polls) >= _POLLS_MAX:
                del self._polls[min(self._polls, key=lambda k: self._polls[k][0])]
        self._polls[key] = (self._n, poll, index)

    def put(self, sample: WireSample) -> None:
        self._n += 1
        self._single[sample["tag"]] = (self._n, sample)

    def __setitem__(self, tag: str, sample: WireSample) -> None:
        self._n += 1
        self._single[tag] = (self._n, sample)

    def __delitem__(self, tag: str) -> None:
        found = tag in self
        self._single.pop(tag, None)
        for k, (order, poll, index) in list(self._polls.items()):
            if tag in index:
                index = {t: i for t, i in index.items() if t != tag}
                self._polls[k] = (order, poll, index)
        if not found:
            raise KeyError(tag)

    def __getitem__(self, tag: str) -> WireSample:
        best = self._single.get(tag)
        order = best[0] if best is not None else -1
        found: WireSample | None = best[1] if best is not None else None
        for n, poll, index in self._polls.values():
            if n > order:
                i = index.get(tag)
                if i is not None:
                    order, found = n, poll[i]
        if found is None:
            raise KeyError(tag)
        return found

    def _tags(self) -> dict[str, None]:
        tags: dict[str, None] = dict.fromkeys(self._single)
        for _, _, index in sorted(self._polls.values(), key=lambda e: e[0]):
            tags.update(dict.fromkeys(index))
        return tags

    def __iter__(self) -> Iterator[str]:
        return iter(self._tags())

    def __len__(self) -> int:
        return len(self._tags())

    def __contains__(self, tag: object) -> bool:
        return tag in self._single or any(tag in index for _, _, index in self._polls.values())

    def __repr__(self) -> str:
        return f"LatestSamples({len(self)} tags)"
