"""mqtt.profile: what validate refuses for AWS IoT Core and Azure IoT Hub (exact texts,
with file:line), the SAS token, its renewal time, the publish-rate bucket and the status
messages where a platform keeps no retained messages and takes no will."""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from pathlib import Path

import orjson
import pytest

from agent.config import Config, ConfigError, parse_config
from agent.publish import cloud
from agent.publish.status import StatusMessages

KEY = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()

DEVICES = """\
devices:
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    tags:
      - {name: strokes, address: 0}
"""


def aws(mqtt: str, devices: str = DEVICES, agent: str = "agent: {id: gw1}\n") -> str:
    return f"{agent}mqtt:\n  profile: aws-iot-core\n{mqtt}{devices}"


AWS_OK = """\
  host: abc-ats.iot.eu-west-1.amazonaws.com
  client_id: gw1
  tls: {cert_file: c.pem, key_file: k.pem}
"""


def azure(mqtt: str, devices: str = DEVICES) -> str:
    return f"agent: {{id: gw1}}\nmqtt:\n  profile: azure-iot-hub\n{mqtt}{devices}"


AZURE_OK = f"""\
  azure: {{hub_host: hub1.azure-devices.net, device_id: gw1, device_key: "{KEY}"}}
  tls: {{}}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    return info.value.problems


def ok(text: str) -> Config:
    return parse_config(text, "c.yaml")


# ------------------------------------------------------------------ AWS IoT Core


def test_aws_accepts_a_complete_config() -> None:
    config = ok(aws(AWS_OK))
    assert config.mqtt.port == 8883
    assert config.mqtt.resolved_client_id("gw1") == "gw1"


def test_aws_needs_thing_name_certificate_and_host_name() -> None:
    assert problems(aws("  host: 10.0.0.1\n")) == [
        "c.yaml:2 mqtt.client_id: aws-iot-core: set client_id to the thing name (AWS IoT "
        "Core identifies the connection by it)",
        "c.yaml:2 mqtt.tls: aws-iot-core needs mutual TLS: a tls section with cert_file and "
        "key_file (the thing's certificate)",
        "c.yaml:4 mqtt.host: aws-iot-core: give the endpoint's host name (e.g. "
        "abc123-ats.iot.eu-west-1.amazonaws.com), not an address: TLS must send the name "
        "(SNI), AWS refuses a connection without it",
    ]


def test_aws_tls_without_client_certificate() -> None:
    text = aws("  host: a.example\n  client_id: gw1\n  tls: {ca_file: ca.pem}\n")
    assert problems(text) == [
        "c.yaml:6 mqtt.tls: aws-iot-core needs the thing's client certificate: set "
        "tls.cert_file and tls.key_file"
    ]


def test_aws_client_id_must_be_a_thing_name() -> None:
    text = aws(AWS_OK.replace("client_id: gw1", "client_id: 'gw 1'"))
    assert problems(text) == [
        "c.yaml:5 mqtt.client_id: aws-iot-core: 'gw 1' is not a thing name (1-128 "
        "characters: letters, digits, ':', '_', '-')"
    ]


def test_aws_topics_at_most_seven_slashes_each_template_checked() -> None:
    text = aws(
        AWS_OK
        + '  topic: "a/b/c/d/e/f/g/{agent}/{device}"\n'
        + '  device_status_topic: "s/1/2/3/4/5/6/7/{device}"\n'
    )
    assert problems(text) == [
        "c.yaml:7 mqtt.topic: aws-iot-core allows at most 7 '/' in a topic; "
        "'a/b/c/d/e/f/g/{agent}/{device}' has 8",
        "c.yaml:8 mqtt.device_status_topic: aws-iot-core allows at most 7 '/' in a topic; "
        "'s/1/2/3/4/5/6/7/{device}' has 8",
    ]
    ok(aws(AWS_OK + '  topic: "a/b/c/d/e/f/{agent}/{device}"\n'))  # 7 is fine


def test_aws_tag_layout_checks_the_tag_topic_and_not_the_unused_one() -> None:
    text = aws(
        AWS_OK
        + "  layout: tag\n"
        + '  topic: "a/b/c/d/e/f/g/h/{device}"\n'  # not used by layout tag
        + '  topic_tag: "a/b/c/d/e/f/{device}/x/{tag}"\n'
    )
    assert problems(text) == [
        "c.yaml:9 mqtt.topic_tag: aws-iot-core allows at most 7 '/' in a topic; "
        "'a/b/c/d/e/f/{device}/x/{tag}' has 8"
    ]


def test_aws_topic_of_the_longest_device_name_over_256_bytes() -> None:
    name = "d" * 250
    devices = DEVICES.replace("press-1", name)
    text = aws(AWS_OK, devices)
    topic = f"edge/gw1/{name}"
    shown = f"{topic[:30]!r}...{topic[-30:]!r} ({len(topic):,} characters)"
    assert problems(text) == [
        f"c.yaml:2 mqtt.topic: aws-iot-core allows topics of at most 256 bytes; {shown} is 259",
        f"c.yaml:2 mqtt.device_status_topic: aws-iot-core allows topics of at most 256 bytes; "
        f"'{('edge-status/gw1/' + name)[:30]}'...'{name[-30:]}' (266 characters) is 266",
    ]


def test_aws_message_and_rate_limits() -> None:
    text = aws(AWS_OK + "  max_message_bytes: 200000\n  max_publishes_per_s: 150\n")
    assert problems(text) == [
        "c.yaml:7 mqtt.max_message_bytes: 200,000 is above aws-iot-core's message limit of "
        "128,000 bytes",
        "c.yaml:8 mqtt.max_publishes_per_s: 150 is above aws-iot-core's 100 publishes per "
        "second per connection",
    ]
    config = ok(aws(AWS_OK + "  max_message_bytes: 64000\n  max_publishes_per_s: 20\n"))
    assert cloud.publish_rate(config.mqtt.profile, config.mqtt.max_publishes_per_s) == (20, 2)


def test_aws_defaults_rate_and_limit() -> None:
    assert cloud.publish_rate("aws-iot-core", None) == (90.0, 10)
    assert cloud.publish_rate("generic", None) is None
    assert cloud.publish_rate("azure-iot-hub", None) is None
    assert cloud.message_limit("aws-iot-core") == 128_000
    assert cloud.message_limit("azure-iot-hub") == 256_000
    assert cloud.message_limit("generic") is None


# ------------------------------------------------------------------ Azure IoT Hub


def test_azure_accepts_sas_and_fills_in_what_the_hub_fixes() -> None:
    config = ok(azure(AZURE_OK))
    m = config.mqtt
    assert (m.host, m.port, m.protocol) == ("hub1.azure-devices.net", 8883, "3.1.1")
    assert m.resolved_client_id("gw1") == "gw1"
    base = "devices/gw1/messages/events/$.ct=application%2Fjson&$.ce=utf-8"
    assert m.topic.format(agent="gw1", device="press-1") == (
        f"{base}&agent=gw1&device=press-1&layout=lean&msg-type=data"  # the default layout
    )
    assert m.status_topic.format(agent="gw1") == f"{base}&agent=gw1&msg-type=status"
    # Layout compact: its metadata goes to the events topic too, named in the properties.
    compact = ok(azure(AZURE_OK + "  layout: compact\n")).mqtt
    assert compact.topic_meta.format(agent="gw1", device="press-1", meta="ab12") == (
        f"{base}&agent=gw1&device=press-1&meta=ab12&layout=compact&msg-type=meta"
    )
    assert compact.topic.format(agent="gw1", device="press-1") == (
        f"{base}&agent=gw1&device=press-1&layout=compact&msg-type=data"
    )


def test_azure_accepts_x509_without_key() -> None:
    text = azure(
        "  azure: {hub_host: hub1.azure-devices.net, device_id: gw1}\n"
        "  tls: {cert_file: c.pem, key_file: k.pem}\n"
    )
    config = ok(text)
    login = cloud.login(config.mqtt)
    assert login == cloud.Login("hub1.azure-devices.net/gw1/?api-version=2021-04-12", None)


def test_azure_needs_its_section() -> None:
    assert problems(azure("  tls: {}\n")) == [
        "c.yaml:3 mqtt.profile: azure-iot-hub needs an azure section: hub_host, device_id "
        "and device_key (or a TLS client certificate)"
    ]


def test_azure_refusals_each_at_its_key() -> None:
    text = azure(
        "  azure: {hub_host: 'bad host', device_id: gw1}\n"
        "  protocol: '5'\n"
        "  layout: sparkplug\n"
        "  sparkplug: {group_id: g}\n"
        "  topic: 'edge/{agent}/{device}'\n"
        "  client_id: other\n"
        "  username: u\n"
        "  password: p\n"
        "  retain_last: true\n"
    )
    assert problems(text) == [
        "c.yaml:2 mqtt.tls: azure-iot-hub accepts TLS connections only: add a tls section "
        "(tls: {} trusts the system's CAs)",
        # The host defaults to hub_host, so its problem is reported there.
        "c.yaml:4 mqtt.azure.hub_host: 'bad host' is neither an IP address nor a host name",
        "c.yaml:4 mqtt.azure: azure-iot-hub needs a login: azure.device_key (SAS token) or "
        "tls.cert_file and tls.key_file (X.509)",
        "c.yaml:5 mqtt.protocol: azure-iot-hub speaks MQTT 3.1.1 only: remove protocol or "
        "set it to '3.1.1'",
        "c.yaml:6 mqtt.layout: azure-iot-hub has fixed topics "
        "(devices/{device_id}/messages/events/): layout sparkplug cannot be used there; use "
        "lean, compact, device or tag",
        "c.yaml:8 mqtt.topic: azure-iot-hub publishes to devices/gw1/messages/events/ with "
        "the names in the message properties: remove topic",
        "c.yaml:9 mqtt.client_id: azure-iot-hub: the client id is azure.device_id; remove "
        "client_id",
        "c.yaml:10 mqtt.username: azure-iot-hub: the login is made from the azure section "
        "(device key or certificate); remove username",
        "c.yaml:11 mqtt.password: azure-iot-hub: the login is made from the azure section "
        "(device key or certificate); remove password",
        "c.yaml:12 mqtt.retain_last: azure-iot-hub keeps no retained messages: remove retain_last",
    ]


def test_azure_key_and_certificate_together_and_a_bad_key() -> None:
    text = azure(
        "  azure: {hub_host: h.azure-devices.net, device_id: gw1, device_key: 'not base64!'}\n"
        "  tls: {cert_file: c.pem, key_file: k.pem}\n"
    )
    assert problems(text) == [
        "c.yaml:4 mqtt.azure.device_key: give azure.device_key or a TLS client certificate, "
        "not both",
        "c.yaml:4 mqtt.azure.device_key: the device key is not base64 (copy the device's "
        "primary or secondary key as shown by the hub)",
    ]


def test_azure_names_in_properties_must_be_unreserved() -> None:
    devices = DEVICES.replace("strokes", "a&b")
    ok(azure(AZURE_OK, devices))  # layout device: tag names are only in the JSON body
    assert problems(azure(AZURE_OK + "  layout: tag\n", devices)) == [
        "c.yaml:12 devices[0].tags[0].name: 'a&b': azure-iot-hub carries this name in the "
        "message properties; use only letters, digits and - . _ ~"
    ]


def test_azure_message_limit_and_section_without_profile() -> None:
    assert problems(azure(AZURE_OK + "  max_message_bytes: 300000\n")) == [
        "c.yaml:6 mqtt.max_message_bytes: 300,000 is above azure-iot-hub's message limit of "
        "256,000 bytes"
    ]
    text = "agent: {id: gw1}\nmqtt:\n  azure: {hub_host: h.example, device_id: gw1}\n" + DEVICES
    assert problems(text) == [
        "c.yaml:3 mqtt.azure: the azure section is used only with profile: azure-iot-hub"
    ]


def test_azure_device_id_pattern() -> None:
    text = azure(AZURE_OK.replace("device_id: gw1", "device_id: 'gw/1'"))
    (problem,) = problems(text)
    assert problem.startswith("c.yaml:4 mqtt.azure.device_id: String should match pattern")


# ------------------------------------------------------------------ SAS token


def _independent_token(uri: str, key_b64: str, expiry: int) -> str:
    encoded = urllib.parse.quote_plus(uri)
    signed = hmac.new(
        base64.b64decode(key_b64), (encoded + "\n" + str(expiry)).encode("utf-8"), "sha256"
    )
    sig = urllib.parse.quote_plus(base64.b64encode(signed.digest()))
    return f"SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}"


def test_sas_token_matches_an_independent_computation() -> None:
    uri = "hub1.azure-devices.net/devices/gw1"
    token = cloud.sas_token(uri, KEY, 1_800_000_000)
    assert token == _independent_token(uri, KEY, 1_800_000_000)
    assert token.startswith("SharedAccessSignature sr=hub1.azure-devices.net%2Fdevices%2Fgw1&sig=")
    assert token.endswith("&se=1800000000")
    # The signature really depends on the key and the expiry.
    other = base64.b64encode(b"another key").decode()
    assert cloud.sas_token(uri, other, 1_800_000_000) != token
    assert cloud.sas_token(uri, KEY, 1_800_000_001) != token


def test_sas_token_vector() -> None:
    # HMAC-SHA256 keyed with b"key", over "h%2Fdevices%2Fd\n0", computed with hashlib.
    digest = hmac.new(b"key", b"h%2Fdevices%2Fd\n0", hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    assert cloud.sas_token("h/devices/d", base64.b64encode(b"key").decode(), 0) == (
        f"SharedAccessSignature sr=h%2Fdevices%2Fd&sig={sig}&se=0"
    )


def test_sas_token_refuses_a_key_that_is_not_base64() -> None:
    with pytest.raises(ValueError, match="the device key is not base64"):
        cloud.sas_token("h/devices/d", "not base64!", 0)


def test_login_makes_a_fresh_token_per_attempt_and_renews_before_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = ok(azure(AZURE_OK.replace("}", ", sas_ttl_s: 1000}", 1)))
    now = [1_700_000_000.25]
    monkeypatch.setattr(cloud, "clock", lambda: now[0])
    first = cloud.login(config.mqtt)
    assert first.username == "hub1.azure-devices.net/gw1/?api-version=2021-04-12"
    uri = "hub1.azure-devices.net/devices/gw1"
    assert first.password == _independent_token(uri, KEY, 1_700_001_000)
    # Renewed at 80 % of the lifetime: well before the token expires.
    assert first.renew_at == pytest.approx(1_700_000_000.25 + 0.8 * 999.75)
    assert first.renew_at is not None
    assert first.renew_at < 1_700_001_000
    now[0] = first.renew_at
    second = cloud.login(config.mqtt)
    assert second.password == _independent_token(uri, KEY, int(first.renew_at) + 1000)
    assert second.password != first.password
    assert second.renew_at is not None
    assert second.renew_at > first.renew_at


def test_login_of_the_generic_profile_is_the_configured_one() -> None:
    config = ok("agent: {id: gw1}\nmqtt: {username: u, password: p}\n" + DEVICES)
    assert cloud.login(config.mqtt) == cloud.Login("u", "p")
    config = ok("agent: {id: gw1}\n" + DEVICES)
    assert cloud.login(config.mqtt) == cloud.Login(None, None)


# ------------------------------------------------------------------ token bucket


def test_token_bucket_allows_rate_times_t_plus_burst() -> None:
    t = [0.0]
    bucket = cloud.TokenBucket(90, 10, now=lambda: t[0])
    allowed = 0
    # Take whenever allowed, stepping the fake clock by 1 ms for one simulated second.
    for _ in range(1000):
        if bucket.delay() == 0:
            bucket.take()
            allowed += 1
        t[0] += 0.001
    assert allowed <= 100  # 90/s + burst 10: AWS's 100 per second is never exceeded
    assert allowed >= 99  # and the bucket does not throttle below what it promises


def test_token_bucket_delay_is_exact() -> None:
    t = [0.0]
    bucket = cloud.TokenBucket(10, 1, now=lambda: t[0])
    assert bucket.delay() == 0
    bucket.take()
    assert bucket.delay() == pytest.approx(0.1)
    t[0] = 0.05
    assert bucket.delay() == pytest.approx(0.05)
    t[0] = 0.1
    assert bucket.delay() == 0
    # Takes without waiting (births at connect) go into debt, which later takes wait off.
    bucket.take()
    bucket.take()
    assert bucket.delay() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="rate must be > 0"):
        cloud.TokenBucket(0, 1)


# ------------------------------------------------------------------ status messages


def test_status_messages_not_retained_and_no_will_on_azure() -> None:
    config = ok(azure(AZURE_OK))
    msgs = StatusMessages(config.agent, config.mqtt, version="1", config_hash="h", started=0)
    assert msgs.will() is None
    online = msgs.online()
    assert not online.retain
    assert online.topic.endswith("&agent=gw1&msg-type=status")
    dev = msgs.device("press-1", "up", None, 0)
    assert not dev.retain
    assert dev.topic.endswith("&agent=gw1&device=press-1&msg-type=device-status")
    removed = msgs.removed("press-1")
    assert not removed.retain
    assert orjson.loads(removed.payload)["state"] == "removed"


def test_status_messages_retained_with_will_on_aws() -> None:
    config = ok(aws(AWS_OK))
    msgs = StatusMessages(config.agent, config.mqtt, version="1", config_hash="h", started=0)
    will = msgs.will()
    assert will is not None
    assert will.retain
    assert msgs.online().retain
    assert msgs.removed("press-1").payload == b""


def test_aws_sparkplug_topics_are_checked_too() -> None:
    name = "d" * 240
    text = aws(
        AWS_OK + "  layout: sparkplug\n  sparkplug: {group_id: plant1}\n",
        DEVICES.replace("press-1", name),
    )
    topic = f"spBv1.0/plant1/DBIRTH/gw1/{name}"
    shown = f"{topic[:30]!r}...{topic[-30:]!r} ({len(topic):,} characters)"
    assert problems(text) == [
        f"c.yaml:10 devices[0].name: aws-iot-core allows topics of at most 256 bytes; "
        f"the Sparkplug topic {shown} is {len(topic)}"
    ]


def test_azure_refuses_a_password_file_of_its_own() -> None:
    assert problems(azure(AZURE_OK + "  password_file: /etc/pw\n")) == [
        "c.yaml:6 mqtt.password_file: azure-iot-hub: the login is made from the azure "
        "section (device key or certificate); remove password_file"
    ]


async def test_an_unreadable_or_bad_key_file_is_a_connect_failure_in_words(
    tmp_path: Path,
) -> None:
    from agent.publish.mqtt import MqttPublisher

    missing = tmp_path / "missing.key"
    text = azure(
        f"  azure: {{hub_host: h.azure-devices.net, device_id: gw1, "
        f"device_key_file: {missing}}}\n  tls: {{}}\n"
    )
    config = ok(text)
    pub = MqttPublisher(config.mqtt, "gw1")
    try:
        assert await pub.connect_once() == "cannot read device_key_file: No such file or directory"
    finally:
        await pub.close()
    missing.write_text("not base64!\n", encoding="utf-8")
    pub = MqttPublisher(config.mqtt, "gw1")
    try:
        assert await pub.connect_once() == "the device key is not base64"
    finally:
        await pub.close()
