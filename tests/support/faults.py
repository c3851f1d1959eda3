"""Fault injection for tests: wrap any pipeline boundary and make chosen calls fail.

A `Faulty` wraps an object (a buffer, a publisher, an encoder, a driver) and passes every
attribute through, except that the calls named in its `FaultPlan` go wrong in a chosen way
at a chosen call number:

    plan = FaultPlan().at("append", 3, Raise(OSError("disk I/O error")))
    buffer = Faulty(MemoryBuffer(), plan)          # the 3rd append raises, the rest work

The faults are those a boundary can show in the field:

- `Raise(exc)`: the call raises `exc` (an unexpected exception, not one of the contract's);
- `Hang()`: the call never returns (an awaited call waits until cancelled; a plain call
  cannot hang without blocking the loop, so `Hang` is only for coroutine methods);
- `Garbage(fn)`: the call runs, and `fn(result)` replaces what it returns (a wrong number of
  results, wrong types, values out of range).

Call numbers count from 1 per method name; `times` repeats a fault on that many calls in
a row (`times=None`: every call from there on). `when=` narrows a rule to the calls whose
arguments it accepts (`when=lambda msgs: msgs[0].topic.startswith("edge/")`), and then
numbers only those calls. `plan.calls[name]` counts the calls seen,
and `plan.fired` lists `(name, call number, fault)` for every fault that went off, so a test
can assert that the fault really was injected (a test that injects nothing cannot pass as a
fault test).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Fault:
    """How a call goes wrong."""

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Raise(Fault):
    exc: BaseException

    def describe(self) -> str:
        return f"raise {type(self.exc).__name__}"


@dataclass(frozen=True)
class Hang(Fault):
    def describe(self) -> str:
        return "hang"


@dataclass(frozen=True)
class Garbage(Fault):
    transform: Callable[[Any], Any]
    name: str = "garbage"

    def describe(self) -> str:
        return self.name


@dataclass
class _Rule:
    method: str
    first_call: int
    times: int | None
    fault: Fault
    when: Callable[..., bool] | None = None
    seen: int = 0  # calls this rule counted (all of the method's, or those `when` took)

    def applies(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if method != self.method:
            return False
        if self.when is not None and not self.when(*args, **kwargs):
            return False
        self.seen += 1
        call = self.seen
        if call < self.first_call:
            return False
        return self.times is None or call < self.first_call + self.times


@dataclass
class FaultPlan:
    """Which calls fail, and how. Rules are checked in the order they were added."""

    rules: list[_Rule] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    fired: list[tuple[str, int, Fault]] = field(default_factory=list)

    def at(
        self,
        method: str,
        call: int,
        fault: Fault,
        *,
        times: int | None = 1,
        when: Callable[..., bool] | None = None,
    ) -> FaultPlan:
        if call < 1:
            raise ValueError("call numbers start at 1")
        self.rules.append(_Rule(method, call, times, fault, when))
        return self

    def _fault_for(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, Fault | None]:
        self.calls[method] += 1
        n = self.calls[method]
        found: Fault | None = None
        for rule in self.rules:
            # Every rule sees every call (its own count must not depend on rule order).
            if rule.applies(method, args, kwargs) and found is None:
                found = rule.fault
        if found is not None:
            self.fired.append((method, n, found))
        return n, found


class Faulty:
    """`target` with the faults of `plan` injected into its method calls."""

    def __init__(self, target: Any, plan: FaultPlan) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_plan", plan)

    @property
    def wrapped(self) -> Any:
        return object.__getattribute__(self, "_target")

    def __getattr__(self, name: str) -> Any:
        target = object.__getattribute__(self, "_target")
        plan: FaultPlan = object.__getattribute__(self, "_plan")
        attr = getattr(target, name)
        if not callable(attr) or not any(r.method == name for r in plan.rules):
            if callable(attr):
                # Count calls of unplanned methods too: a test may want to know.
                return _counting(attr, name, plan)
            return attr
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            async def async_call(*args: Any, **kwargs: Any) -> Any:
                _, fault = plan._fault_for(name, args, kwargs)
                if isinstance(fault, Raise):
                    raise fault.exc
                if isinstance(fault, Hang):
                    await asyncio.Event().wait()
                result = await attr(*args, **kwargs)
                if isinstance(fault, Garbage):
                    return fault.transform(result)
                return result

            return async_call

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            _, fault = plan._fault_for(name, args, kwargs)
            if isinstance(fault, Raise):
                raise fault.exc
            if isinstance(fault, Hang):
                raise TypeError(f"Hang() needs a coroutine method; {name} is not one")
            result = attr(*args, **kwargs)
            if isinstance(fault, Garbage):
                return fault.transform(result)
            return result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_target"), name, value)


def _counting(attr: Callable[..., Any], name: str, plan: FaultPlan) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(attr):

        @functools.wraps(attr)
        async def async_call(*args: Any, **kwargs: Any) -> Any:
            plan.calls[name] += 1
            return await attr(*args, **kwargs)

        return async_call

    @functools.wraps(attr)
    def call(*args: Any, **kwargs: Any) -> Any:
        plan.calls[name] += 1
        return attr(*args, **kwargs)

    return call
