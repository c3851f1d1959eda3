"""The offline package, built by scripts/build-offline and installed by its install.sh
exactly as on a gateway, but into a temporary root and without systemd
(EDGE_AGENT_SYSTEMD=0; deploy/check-offline.sh runs the same commands under systemd in a
network-less Debian 12).

The upgrade test: the old release (the agent as of OLD_RELEASE_REF, main when the package
was introduced, so later buffer formats are crossed as they land) fills its buffer while the
broker is down; the new release is installed over it and delivers every buffered sample once
the broker is up. Then rollback, a refused rollback across a buffer format it cannot read,
a refused downgrade, an invalid config that changes nothing, and uninstall.

Building needs PyPI (pip download of the dependency wheels; pip's cache makes a rebuild
take seconds). Installing needs no network: pip runs with --no-index.
"""

from __future__ import annotations

import os
import queue
import shutil
import sqlite3
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agent_proc import ROOT, AgentProcess, assert_continuous, counter_device
from tests.support.broker import MosquittoBroker, free_port, require_mosquitto
from tests.support.payloads import samples

# Building two packages (pip download, wheels) runs inside the first test's time.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

#: The agent's sources the "old" release is built from (git archive of this commit).
OLD_RELEASE_REF = "8773dae"
OLD, NEW = "0.9.0", "1.0.0"


@dataclass(frozen=True)
class Packages:
    old: Path
    new: Path


def _build(out: Path, version: str, src: Path | None = None) -> Path:
    args = [str(ROOT / "scripts" / "build-offline"), "--out", str(out), "--version", version]
    if src is not None:
        args += ["--src", str(src)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    base = tmp_path_factory.mktemp("packages")
    old_src = base / "old-src"
    old_src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD_RELEASE_REF],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert archive.returncode == 0, (
        f"git archive {OLD_RELEASE_REF} failed (a clone without history?): "
        f"{archive.stderr.decode()}"
    )
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive.stdout, check=True)
    return Packages(old=_build(base, OLD, old_src), new=_build(base, NEW))


@dataclass
class Gateway:
    """A temporary root laid out like a gateway: /opt/edge-agent, /etc/edge-agent, ..."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "EDGE_AGENT_SYSTEMD": "0",
            "EDGE_AGENT_PREFIX": str(self.prefix),
            "EDGE_AGENT_ETC": str(self.etc),
            "EDGE_AGENT_STATE": str(self.state),
            "EDGE_AGENT_BIN": str(self.root / "usr-local-bin"),
        }

    @property
    def prefix(self) -> Path:
        return self.root / "opt"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env,
            cwd=self.root,
            check=False,
        )

    def unpack(self, package: Path) -> Path:
        """`tar xzf edge-agent-<v>-linux-<arch>.tar.gz`; returns the unpacked folder."""
        with tarfile.open(package) as tar:
            tar.extractall(self.root / "carry", filter="tar")
        return self.root / "carry" / package.name.removesuffix(".tar.gz")

    def link(self, name: str) -> str:
        return os.readlink(self.prefix / name)

    def agent(self, log: Path, *args: str) -> AgentProcess:
        return ReleaseAgent(self.prefix / "current" / "venv" / "bin" / "edge-agent", log, *args)


class ReleaseAgent(AgentProcess):
    """The agent of an installed release (its own venv), not this checkout's."""

    def __init__(self, binary: Path, log_path: Path, *args: str) -> None:
        super().__init__(log_path, *args)
        self.binary = binary

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), *self.args],
                cwd="/",
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
            )
        return self


class MosquittoSub:
    """Debian's mosquitto_sub as the consumer (QoS 1, MQTT 5): the seqs of every sample
    received. Entering returns once the broker acknowledged the subscription."""

    def __init__(self, port: int, topic: str) -> None:
        self.args = [
            "stdbuf",
            "-oL",
            "mosquitto_sub",
            "-d",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-V",
            "mqttv5",
        ]
        self.args += ["-q", "1", "-t", topic, "-F", "%p"]
        self.seqs: list[int] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> MosquittoSub:
        if shutil.which("mosquitto_sub") is None:
            pytest.fail("mosquitto_sub is missing (apt-get install mosquitto-clients)")
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                self._lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        self._read_until(lambda line: "SUBACK" in line, 10)
        return self

    def _read_until(self, done: Callable[[str], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line.startswith("{"):
                self.seqs += [int(x["seq"]) for x in samples([line.encode()])]
            if done(line):
                return
        raise AssertionError(f"mosquitto_sub: timed out; seqs so far {sorted(set(self.seqs))}")

    def wait_for(self, cond: Callable[[list[int]], bool], timeout_s: float) -> list[int]:
        self._read_until(lambda _line: cond(self.seqs), timeout_s)
        return list(self.seqs)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker(binary=require_mosquitto()) as b:
        yield b


def _write_config(gw: Gateway, broker_port: int) -> Path:
    # A plant's config names the PLC's real port (install.sh validates it as `run` does,
    # which refuses port 0); the tests run it with --simulate, which serves that port.
    plant_device = counter_device("press-1", 0.05).replace("port: 0", f"port: {free_port()}")
    path = gw.root / "plant.yaml"
    path.write_text(
        f"""\
agent: {{id: gw-upgrade}}
buffer: {{path: {gw.state / "buffer.db"}}}
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min_s: 0.2, reconnect_max_s: 0.5}}
devices:
{plant_device}""",
        encoding="utf-8",
    )
    return path


def _buffer_records(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT count(*) FROM records").fetchone()[0])
    finally:
        con.close()


def test_package_holds_wheels_for_the_target_and_installs_offline(
    packages: Packages, gateway: Gateway
) -> None:
    with tarfile.open(packages.new) as tar:
        names = tar.getnames()
    top = packages.new.name.removesuffix(".tar.gz")
    assert top == f"edge-agent-{NEW}-linux-x86_64"
    for part in ("install.sh", "edge-agent-rollback", "uninstall.sh", "lib.sh", "SHA256SUMS",
                 "edge-agent-collect.service", "docs/datasets.md"):  # fmt: skip
        assert f"{top}/{part}" in names
    wheels = [n.rsplit("/", 1)[1] for n in names if n.endswith(".whl")]
    assert f"edge_agent-{NEW}-py3-none-any.whl" in wheels
    native = [w for w in wheels if not w.endswith("-none-any.whl")]
    # The compiled dependencies, each for CPython 3.11 on x86_64 (Debian 12's Python).
    for dist in ("orjson", "pydantic_core", "cryptography", "pyyaml"):
        (wheel,) = [w for w in native if w.lower().startswith(dist + "-")]
        assert "x86_64" in wheel
        assert "cp311" in wheel
    pkg = gateway.unpack(packages.new)
    # pip may not reach any index: a proxy that points nowhere proves it.
    env = {
        **gateway.env,
        "PIP_INDEX_URL": "http://127.0.0.1:9/",
        "https_proxy": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [str(pkg / "install.sh")], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert gateway.link("current") == f"releases/{NEW}"
    release = gateway.prefix / "releases" / NEW
    assert (release / "edge-agent-collect.service").is_file()  # the collector's unit, not
    assert (release / "docs" / "datasets.md").is_file()  # enabled (docs/datasets.md)
    assert (gateway.etc / "agent.yaml").read_text() == (ROOT / "deploy" / "agent.yaml").read_text()
    version = gateway.run(gateway.root / "usr-local-bin" / "edge-agent", "--version")
    assert version.stdout.strip() == f"edge-agent {NEW}"
    from agent.buffer.sqlite import FORMAT_VERSION

    assert (gateway.prefix / "releases" / NEW / "BUFFER_FORMAT").read_text().strip() == str(
        FORMAT_VERSION
    )


def test_build_all_architectures(tmp_path: Path) -> None:
    """`scripts/build-offline --arch all`, as docs/install.md says: one file per
    architecture, each with the native wheels of its own. (The aarch64 one is built and
    checked here, never run: this machine is x86_64.)"""
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-offline"), "--arch", "all", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = sorted(p.name for p in tmp_path.glob("*.tar.gz"))
    from agent import __version__ as version

    assert built == [
        f"edge-agent-{version}-linux-aarch64.tar.gz",
        f"edge-agent-{version}-linux-x86_64.tar.gz",
    ]
    for arch, other in (("aarch64", "x86_64"), ("x86_64", "aarch64")):
        with tarfile.open(tmp_path / f"edge-agent-{version}-linux-{arch}.tar.gz") as tar:
            names = tar.getnames()
            top = f"edge-agent-{version}-linux-{arch}"
            member = tar.extractfile(f"{top}/ARCH")
            assert member is not None
            assert member.read().decode().strip() == arch
        native = [n for n in names if n.endswith(".whl") and not n.endswith("-none-any.whl")]
        assert len(native) >= 5, native  # orjson, pydantic-core, cryptography, cffi, PyYAML
        assert all(arch in n and other not in n for n in native), native


def test_upgrade_keeps_config_certs_and_buffer_and_delivers_the_backlog(
    packages: Packages, gateway: Gateway, broker: MosquittoBroker
) -> None:
    config = _write_config(gateway, broker.port)
    broker.stop()  # the plant's broker is down while the old release runs

    old_pkg = gateway.unpack(packages.old)
    done = gateway.run(old_pkg / "install.sh", "--config", config)
    assert done.returncode == 0, done.stderr
    assert gateway.link("current") == f"releases/{OLD}"
    certs = gateway.etc / "certs"
    certs.mkdir()
    (certs / "client.pem").write_text("kept\n")
    (gateway.etc / "edge-agent.env").write_text("MQTT_PASSWORD=kept\n")

    with gateway.agent(
        gateway.root / "old.log", "run", str(gateway.etc / "agent.yaml"), "--simulate"
    ) as old:
        buffer = gateway.state / "buffer.db"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "agent.started" not in old.log():
            time.sleep(0.1)
        time.sleep(2.0)  # ~40 polls buffered, none delivered
        assert old.terminate() == 0, old.log()
    from tests.support.agent_proc import last_seq_logged

    last_old = last_seq_logged(old)
    assert last_old >= 20, old.log()
    backlog = _buffer_records(buffer)
    assert backlog > 0

    config_before = (gateway.etc / "agent.yaml").read_bytes()
    ancient = gateway.prefix / "releases" / "0.0.1"  # an older release left from before
    ancient.mkdir()
    (ancient / ".complete").touch()
    new_pkg = gateway.unpack(packages.new)
    done = gateway.run(new_pkg / "install.sh")
    assert done.returncode == 0, done.stderr
    # Only the current and the previous release stay installed.
    assert sorted(p.name for p in (gateway.prefix / "releases").iterdir()) == [OLD, NEW]
    assert "install.sh: removed old release 0.0.1" in done.stderr
    assert f"release {NEW} is current (previous: {OLD})" in done.stderr
    assert gateway.link("current") == f"releases/{NEW}"
    assert gateway.link("previous") == f"releases/{OLD}"
    assert (gateway.etc / "agent.yaml").read_bytes() == config_before
    assert (certs / "client.pem").read_text() == "kept\n"
    assert (gateway.etc / "edge-agent.env").read_text() == "MQTT_PASSWORD=kept\n"
    assert _buffer_records(buffer) == backlog  # the installer never touches the buffer

    broker.start()
    with (
        MosquittoSub(broker.port, "edge/gw-upgrade/#") as sub,
        gateway.agent(
            gateway.root / "new.log", "run", str(gateway.etc / "agent.yaml"), "--simulate"
        ) as new,
    ):
        got = sub.wait_for(lambda seen: set(range(1, last_old + 1)) <= set(seen), timeout_s=60)
        assert new.terminate() == 0, new.log()
    assert_continuous(got)
    # The new release went on from the old one's seq high-water mark (no reuse).
    assert max(got) >= last_old
    assert f'"version": "{NEW}"' in new.log()  # agent.starting names the release

    # Roll back: the new release wrote its buffer in a newer format than the old release
    # reads, so the rollback is refused with what to do, and nothing changes.
    from agent.buffer.sqlite import FORMAT_VERSION

    done = gateway.run(gateway.prefix / "bin" / "edge-agent-rollback")
    assert done.returncode == 1, done.stderr
    assert f"in format {FORMAT_VERSION}, and release {OLD} reads format 1 at most" in done.stderr
    assert "Nothing was changed" in done.stderr
    assert gateway.link("current") == f"releases/{NEW}"
    # The buffer is empty (everything was delivered): moved aside as the message says,
    # the rollback goes through; the config stays.
    buffer = gateway.state / "buffer.db"
    for part in gateway.state.glob("buffer.db*"):
        part.rename(part.with_name(part.name.replace("buffer.db", "buffer.db.v2")))
    assert not buffer.exists()
    done = gateway.run(gateway.prefix / "bin" / "edge-agent-rollback")
    assert done.returncode == 0, done.stderr
    assert f"release {OLD} is current (previous: {NEW})" in done.stderr
    assert gateway.link("current") == f"releases/{OLD}"
    # And forward again (current and previous swap).
    done = gateway.run(gateway.root / "usr-local-bin" / "edge-agent-rollback")
    assert done.returncode == 0, done.stderr
    assert gateway.link("current") == f"releases/{NEW}"


def _set_buffer_format(path: Path, version: int) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute(f"PRAGMA user_version = {version}")
        con.commit()
    finally:
        con.close()


def _make_buffer(gateway: Gateway, config: Path) -> Path:
    """A real buffer, written by the installed release (broker down: nothing leaves it)."""
    with gateway.agent(gateway.root / "fill.log", "run", str(config), "--simulate") as agent:
        buffer = gateway.state / "buffer.db"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not buffer.exists():
            time.sleep(0.1)
        time.sleep(1.0)
        assert agent.terminate() == 0, agent.log()
    return gateway.state / "buffer.db"


def test_rollback_and_downgrade_across_a_buffer_format_change_are_refused(
    packages: Packages, gateway: Gateway, broker: MosquittoBroker
) -> None:
    config = _write_config(gateway, broker.port)
    broker.stop()
    assert (
        gateway.run(gateway.unpack(packages.old) / "install.sh", "--config", config).returncode == 0
    )
    new_pkg = gateway.unpack(packages.new)
    assert gateway.run(new_pkg / "install.sh").returncode == 0
    buffer = _make_buffer(gateway, gateway.etc / "agent.yaml")
    records = _buffer_records(buffer)
    # What a newer release that changed the record format would leave behind: the old
    # release (format 1) could not open it.
    _set_buffer_format(buffer, 99)
    (gateway.prefix / "releases" / NEW / "BUFFER_FORMAT").write_text("99\n")

    done = gateway.run(gateway.prefix / "bin" / "edge-agent-rollback")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"edge-agent-rollback: refused: the buffer {buffer} holds {records} records in format "
        f"99, and release {OLD} reads format 1 at most: it could not deliver them. Nothing was "
        f"changed; release {NEW} keeps running. To roll back anyway, let it deliver the backlog "
        f"(edge-agent status: buffer records 0), stop it, move {buffer} aside, then run "
        "edge-agent-rollback again"
    )
    assert gateway.link("current") == f"releases/{NEW}"
    assert gateway.link("previous") == f"releases/{OLD}"

    # Installing the old package again is the same downgrade: refused the same way.
    old_pkg = gateway.root / "carry" / packages.old.name.removesuffix(".tar.gz")
    done = gateway.run(old_pkg / "install.sh")
    assert done.returncode == 1
    assert f"refused: the buffer {buffer} ({records} records) is in format 99" in done.stderr
    assert gateway.link("current") == f"releases/{NEW}"
    assert _buffer_records(buffer) == records

    # With the buffer delivered and moved aside, as the message says, the rollback goes.
    shutil.move(buffer, gateway.root / "buffer-format-99.db")
    done = gateway.run(gateway.prefix / "bin" / "edge-agent-rollback")
    assert done.returncode == 0, done.stderr
    assert gateway.link("current") == f"releases/{OLD}"


def test_invalid_config_changes_nothing_and_uninstall_keeps_the_data(
    packages: Packages, gateway: Gateway, broker: MosquittoBroker
) -> None:
    config = _write_config(gateway, broker.port)
    pkg = gateway.unpack(packages.new)
    assert gateway.run(pkg / "install.sh", "--config", config).returncode == 0
    bad = gateway.root / "bad.yaml"
    bad.write_text("agent: {id: gw}\nmqtt: {prot: 1}\ndevices: []\n")
    done = gateway.run(pkg / "install.sh", "--config", bad)
    assert done.returncode == 2
    assert "unknown key 'prot'" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"install.sh: {bad} is not valid for release {NEW} (problems above); nothing was "
        "changed. Fix the file and run install.sh again"
    )
    assert (gateway.etc / "agent.yaml").read_text() == config.read_text()
    assert sorted(p.name for p in gateway.etc.iterdir()) == ["agent.yaml", "edge-agent.env"]

    (gateway.state / "buffer.db").write_bytes(b"")  # stands for the buffer
    done = gateway.run(gateway.prefix / "bin" / "uninstall.sh")
    assert done.returncode == 0, done.stderr
    assert not gateway.prefix.exists()
    assert not (gateway.root / "usr-local-bin" / "edge-agent").exists()
    assert (gateway.state / "buffer.db").exists()
    assert (gateway.etc / "agent.yaml").exists()
    done = gateway.run(pkg / "uninstall.sh", "--purge")
    assert done.returncode == 0, done.stderr
    assert not gateway.etc.exists()
    assert not gateway.state.exists()


def test_package_for_another_architecture_is_refused_before_anything(
    packages: Packages, gateway: Gateway
) -> None:
    pkg = gateway.unpack(packages.new)
    (pkg / "ARCH").write_text("aarch64\n")
    done = gateway.run(pkg / "install.sh")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"install.sh: this package is for aarch64 and this machine is x86_64: use "
        f"edge-agent-{NEW}-linux-x86_64.tar.gz"
    )
    assert not gateway.prefix.exists()


def test_damaged_package_is_refused(packages: Packages, gateway: Gateway) -> None:
    pkg = gateway.unpack(packages.new)
    wheel = next((pkg / "wheels").glob("orjson-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    done = gateway.run(pkg / "install.sh")
    assert done.returncode == 1
    assert "the package is damaged" in done.stderr
    assert not gateway.prefix.exists()
