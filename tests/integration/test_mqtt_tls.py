"""MqttPublisher over TLS and mutual TLS against a real mosquitto with test certificates.

Every bad variant must end in one clear `mqtt.connect.failed` reason, keep retrying, and
never reach the broker's plain listener (no fallback to plaintext)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config import MqttConfig
from agent.publish import Message, PublishResult
from agent.publish.mqtt import MqttPublisher
from agent.publish.tls import VAGUE_CLOSE
from tests.support.broker import MosquittoBroker, TlsListener, require_mosquitto
from tests.support.certs import TestPki, encrypt_key

pytestmark = pytest.mark.integration

WAIT_S = 15.0
CLIENT_ID = "tls-test-pub"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


BrokerMaker = Callable[..., MosquittoBroker]


@pytest.fixture
def tls_broker(pki: TestPki) -> Iterator[BrokerMaker]:
    binary = require_mosquitto()
    started: list[MosquittoBroker] = []

    def make(
        *, cert: Path | None = None, key: Path | None = None, require_cert: bool = True
    ) -> MosquittoBroker:
        listener = TlsListener(
            certfile=cert or pki.server_cert,
            keyfile=key or pki.server_key,
            cafile=pki.ca,
            require_certificate=require_cert,
        )
        broker = MosquittoBroker(tls=listener, binary=binary)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.close()


def _config(broker: MosquittoBroker, **tls: Any) -> MqttConfig:
    return MqttConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": broker.tls_port,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.2,
            "tls": tls,
        }
    )


def _mtls(pki: TestPki, **overrides: Any) -> dict[str, Any]:
    return {
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
        **overrides,
    }


@asynccontextmanager
async def _publisher(config: MqttConfig) -> AsyncIterator[MqttPublisher]:
    pub = MqttPublisher(config, CLIENT_ID)
    await pub.start()
    try:
        yield pub
    finally:
        await pub.close()


async def _until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():  # state owned by another process; nothing to await
            await asyncio.sleep(0.01)
    assert predicate(), what


async def _failure_reasons(config: MqttConfig, broker: MosquittoBroker) -> list[str]:
    """Run a publisher until it failed three times; return the logged reasons."""
    with capture_logs() as logs:
        async with _publisher(config) as pub:
            await _until(lambda: pub.stats().connect_failures >= 3, "three failed attempts")
            assert not pub.connected
    # Never a plaintext attempt: the plain listener saw no client at all.
    assert CLIENT_ID not in broker.log_text()
    return [e["reason"] for e in logs if e["event"] == "mqtt.connect.failed"]


def test_tls_port_defaults_to_8883() -> None:
    assert MqttConfig.model_validate({"tls": {}}).port == 8883
    assert MqttConfig.model_validate({"tls": {}, "port": 443}).port == 443


async def test_mutual_tls_publishes_and_acks(pki: TestPki, tls_broker: BrokerMaker) -> None:
    broker = tls_broker()
    async with _publisher(_config(broker, **_mtls(pki))) as pub:
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        # Many small messages: PUBACKs arrive several per TLS record, so this fails
        # (timeout) if the reader does not drain what the SSL layer has buffered.
        batch = [Message("t/tls", f"m{i}".encode()) for i in range(500)]
        assert await pub.publish(batch) == [PublishResult(True)] * len(batch)
        assert await pub.publish([Message("t/tls", b"one")]) == [PublishResult(True)]
    assert "New client connected from 127.0.0.1" in broker.log_text()


async def test_encrypted_key_with_passphrase_file_never_logged(
    pki: TestPki, tls_broker: BrokerMaker, tmp_path: Path
) -> None:
    secret = "s3cret-Passphrase-471"
    key = encrypt_key(pki.client_key, tmp_path / "enc.key", secret)
    pw_file = tmp_path / "pass"
    pw_file.write_text(secret + "\n", encoding="utf-8")
    broker = tls_broker()
    good = _config(broker, **_mtls(pki, key_file=str(key), key_password_file=str(pw_file)))
    with capture_logs() as logs:
        async with _publisher(good) as pub:
            async with asyncio.timeout(WAIT_S):
                await pub.wait_connected()
        wrong = _config(broker, **_mtls(pki, key_file=str(key), key_password="not-it"))
        async with _publisher(wrong) as pub:
            await _until(lambda: pub.stats().connect_failures >= 2, "two failed attempts")
    reasons = [e["reason"] for e in logs if e["event"] == "mqtt.connect.failed"]
    assert reasons == [f"tls.key_file {key}: wrong or missing passphrase"]
    assert secret not in repr(logs)
    assert "not-it" not in repr(logs)
    assert secret not in repr(good)
    assert "not-it" not in repr(wrong)


async def test_unknown_ca_is_refused(pki: TestPki, tls_broker: BrokerMaker) -> None:
    broker = tls_broker()
    reasons = await _failure_reasons(
        _config(broker, **_mtls(pki, ca_file=str(pki.other_ca))), broker
    )
    assert len(reasons) == 1
    assert reasons[0].startswith("the broker's certificate is not signed by a trusted CA")


async def test_wrong_hostname_is_refused(pki: TestPki, tls_broker: BrokerMaker) -> None:
    broker = tls_broker(cert=pki.wrong_host_server_cert, key=pki.wrong_host_server_key)
    reasons = await _failure_reasons(_config(broker, **_mtls(pki)), broker)
    assert len(reasons) == 1
    assert reasons[0].startswith("the broker's certificate is not valid for '127.0.0.1'")


async def test_expired_server_certificate_is_refused(pki: TestPki, tls_broker: BrokerMaker) -> None:
    broker = tls_broker(cert=pki.expired_server_cert, key=pki.expired_server_key)
    reasons = await _failure_reasons(_config(broker, **_mtls(pki)), broker)
    assert reasons == ["the broker's certificate has expired"]


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("expired", "the broker rejected our client certificate: it has expired"),
        ("rogue", "the broker rejected our client certificate"),
        ("missing", "the broker requires a client certificate"),
    ],
)
async def test_bad_client_certificate_is_refused(
    pki: TestPki, tls_broker: BrokerMaker, variant: str, expected: str
) -> None:
    broker = tls_broker()
    tls = {
        "expired": _mtls(
            pki, cert_file=str(pki.expired_client_cert), key_file=str(pki.expired_client_key)
        ),
        "rogue": _mtls(
            pki, cert_file=str(pki.rogue_client_cert), key_file=str(pki.rogue_client_key)
        ),
        "missing": {"ca_file": str(pki.ca)},
    }[variant]
    reasons = await _failure_reasons(_config(broker, **tls), broker)
    # The broker's alert races with its close: some attempts only see the close, which
    # is reported in words of its own but never logged over the precise reason.
    assert 1 <= len(reasons) <= 2, reasons
    assert all(r.startswith(expected) or r == VAGUE_CLOSE for r in reasons), reasons
    assert reasons[-1].startswith(expected) or reasons == [VAGUE_CLOSE], reasons


async def test_key_readable_by_others_is_refused_then_retried(
    pki: TestPki, tls_broker: BrokerMaker, tmp_path: Path
) -> None:
    key = tmp_path / "client.key"
    key.write_bytes(pki.client_key.read_bytes())
    key.chmod(0o644)
    broker = tls_broker()
    with capture_logs() as logs:
        async with _publisher(_config(broker, **_mtls(pki, key_file=str(key)))) as pub:
            await _until(lambda: pub.stats().connect_failures >= 2, "two failed attempts")
            key.chmod(0o600)  # the operator fixes it; the agent retries by itself
            async with asyncio.timeout(WAIT_S):
                await pub.wait_connected()
    reasons = [e["reason"] for e in logs if e["event"] == "mqtt.connect.failed"]
    assert reasons == [
        f"tls.key_file {key} is accessible by group or others (mode 0644); run: chmod 600 {key}"
    ]


async def test_missing_ca_file_is_one_clear_message(
    pki: TestPki, tls_broker: BrokerMaker, tmp_path: Path
) -> None:
    broker = tls_broker()
    missing = tmp_path / "nope.pem"
    reasons = await _failure_reasons(_config(broker, **_mtls(pki, ca_file=str(missing))), broker)
    assert reasons == [f"tls.ca_file {missing}: no such file"]
