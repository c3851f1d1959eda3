"""The fault-injection layer itself (tests/support/faults.py) does what it says."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.faults import FaultPlan, Faulty, Garbage, Hang, Raise


class Target:
    def __init__(self) -> None:
        self.value = 1

    def plain(self, x: int) -> int:
        return x * 2

    async def coro(self, x: int) -> int:
        await asyncio.sleep(0)
        return x + 1


async def test_raise_at_the_chosen_call_only() -> None:
    plan = FaultPlan().at("coro", 2, Raise(OSError("disk")))
    t = Faulty(Target(), plan)
    assert await t.coro(1) == 2
    with pytest.raises(OSError, match="disk"):
        await t.coro(1)
    assert await t.coro(1) == 2
    assert [(m, n) for m, n, _ in plan.fired] == [("coro", 2)]


async def test_hang_waits_until_cancelled() -> None:
    t = Faulty(Target(), FaultPlan().at("coro", 1, Hang()))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await t.coro(1)


def test_garbage_replaces_the_result_and_times_repeats() -> None:
    plan = FaultPlan().at("plain", 1, Garbage(lambda r: -r), times=2)
    t = Faulty(Target(), plan)
    assert [t.plain(3), t.plain(3), t.plain(3)] == [-6, -6, 6]
    assert plan.calls["plain"] == 3


def test_times_none_fails_every_call_from_then_on() -> None:
    t = Faulty(Target(), FaultPlan().at("plain", 2, Raise(KeyError("x")), times=None))
    assert t.plain(1) == 2
    for _ in range(3):
        with pytest.raises(KeyError):
            t.plain(1)


def test_attributes_pass_through_and_hang_needs_a_coroutine() -> None:
    target = Target()
    t = Faulty(target, FaultPlan().at("plain", 1, Hang()))
    assert t.value == 1
    t.value = 5
    assert target.value == 5
    assert t.wrapped is target
    with pytest.raises(TypeError, match="coroutine"):
        t.plain(1)
    with pytest.raises(ValueError, match="start at 1"):
        FaultPlan().at("plain", 0, Hang())


def test_when_narrows_a_rule_and_numbers_only_its_calls() -> None:
    plan = FaultPlan().at("plain", 2, Raise(KeyError("odd")), when=lambda x: x % 2 == 1)
    t = Faulty(Target(), plan)
    assert t.plain(1) == 2  # 1st odd call
    assert t.plain(2) == 4  # not counted by the rule
    with pytest.raises(KeyError):
        t.plain(3)  # 2nd odd call
    assert t.plain(5) == 10
    assert [(m, n) for m, n, _ in plan.fired] == [("plain", 3)]
