"""Fixtures that start real servers on loopback: a mosquitto broker and test subscribers.

Tests that use them are skipped when mosquitto is not installed, except under CI=true,
where they fail (see tests/support/broker.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import pytest

from tests.support.broker import MosquittoBroker, require_mosquitto
from tests.support.subscriber import Subscriber


class BrokerFactory(Protocol):
    def __call__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        extra_config: Sequence[str] = (),
    ) -> MosquittoBroker: ...


@pytest.fixture
def broker_factory() -> Iterator[BrokerFactory]:
    """Start brokers with special settings (users, ACL, extra config); all are stopped and
    cleaned up after the test."""
    binary = require_mosquitto()
    started: list[MosquittoBroker] = []

    def make(
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        extra_config: Sequence[str] = (),
    ) -> MosquittoBroker:
        broker = MosquittoBroker(users=users, acl=acl, extra_config=extra_config, binary=binary)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.close()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started mosquitto on 127.0.0.1 and a free port, anonymous access, no persistence."""
    return broker_factory()


SubscriberFactory = Callable[..., Subscriber]


@pytest.fixture
def subscriber_factory() -> Iterator[SubscriberFactory]:
    """subscriber_factory(broker, topic_filter="#", **Subscriber kwargs) → a subscribed
    Subscriber, closed after the test."""
    made: list[Subscriber] = []

    def make(broker: MosquittoBroker, topic_filter: str = "#", **kwargs: Any) -> Subscriber:
        sub = Subscriber(broker.host, broker.port, topic_filter, **kwargs)
        made.append(sub)
        return sub.start()

    yield make
    for sub in made:
        sub.close()
