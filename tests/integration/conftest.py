"""Fixtures that start real servers on loopback: a mosquitto broker, test subscribers,
and `any_broker`, which runs a test once against mosquitto and once against a second
MQTT implementation (NATS's MQTT listener, tests/support/nats.py).

Tests that use them are skipped when mosquitto (or nats-server) is not installed, except
under CI=true, where they fail (see tests/support/broker.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pytest

from tests.support.broker import MosquittoBroker, require_mosquitto
from tests.support.nats import NatsBroker, require_nats
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


@dataclass(frozen=True)
class BrokerUnderTest:
    """One broker implementation: where it listens and the MQTT version to speak to it
    (NATS speaks 3.1.1 only)."""

    name: Literal["mosquitto", "nats"]
    host: str
    port: int
    protocol: Literal["5", "3.1.1"]


@pytest.fixture(params=["mosquitto", "nats"])
def any_broker(request: pytest.FixtureRequest) -> Iterator[BrokerUnderTest]:
    """A started broker, once per implementation: mosquitto (MQTT 5) and nats-server's
    MQTT listener (MQTT 3.1.1), so that a test assumes nothing only mosquitto does."""
    if request.param == "mosquitto":
        with MosquittoBroker(binary=require_mosquitto()) as mosquitto:
            yield BrokerUnderTest("mosquitto", mosquitto.host, mosquitto.port, "5")
    else:
        with NatsBroker(binary=require_nats()) as nats:
            yield BrokerUnderTest("nats", nats.host, nats.port, "3.1.1")
