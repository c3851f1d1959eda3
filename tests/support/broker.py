"""A real mosquitto broker for tests and benchmarks.

`MosquittoBroker` runs Debian's `mosquitto` binary with a config file of its own in a
temporary directory, listening on 127.0.0.1 on a port the OS chose, with persistence off
and its log written to a file (see `log_text()`). It can be stopped, killed, paused and
restarted on the same port, and always cleans up its process and directory.

Privileges: mosquitto started as root switches to the `mosquitto` user, which then cannot
read password/ACL files in a private temporary directory (pytest's tmp dirs are 0700).
When we run as root the config therefore says `user root`, which keeps mosquitto from
dropping privileges; as any other user mosquitto never switches user and reads our files
as us. Either way no file needs to be made world-readable.

`mosquitto_path()` finds the binary (PATH, then /usr/sbin). `require_mosquitto()` skips the
calling test when it is missing, except under CI (env CI=true), where it fails instead:
CI installs mosquitto, so a missing binary there is a broken pipeline, not a reason to skip.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from tests.support.children import die_with_parent

_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_binary(name: str, fallbacks: Sequence[str]) -> str | None:
    """Path of program `name` (PATH first, then `fallbacks`), or None."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in fallbacks:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_binary(name: str, fallbacks: Sequence[str]) -> str:
    """The binary of Debian package `name`; skips the test when it is missing (fails
    instead when CI=true: CI must install it)."""
    path = find_binary(name, fallbacks)
    if path is None:
        reason = f"{name} is not installed (apt-get install {name})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI must install it", pytrace=False)
        pytest.skip(reason)
    return path


def mosquitto_path() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    return find_binary("mosquitto", _FALLBACK_PATHS)


def require_mosquitto() -> str:
    """The mosquitto binary; skips the test when missing (fails instead when CI=true)."""
    return require_binary("mosquitto", _FALLBACK_PATHS)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, below the OS's ephemeral range.

    Servers the tests stop and start again (a broker outage) keep their port while they
    are down. A port from the ephemeral range (what binding port 0 gives) can meanwhile be
    taken as the source port of an outgoing connection — by another test, or by the
    agent itself retrying that very port, which then connects to itself (TCP
    simultaneous open) — and the restart fails with "Address already in use". So a
    random free port below the ephemeral range is taken; the OS's choice only when there
    is none."""
    low = _ephemeral_low()
    if low > _PORT_FLOOR + 1000:
        for _ in range(200):
            port = _rng.randrange(_PORT_FLOOR, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: How long a start keeps trying while its port is still held by another socket.
_BUSY_RETRY_S = 10.0
#: The lowest port `free_port` picks (below: well-known and registered services).
_PORT_FLOOR = 10_000
_rng = random.Random()


def _ephemeral_low() -> int:
    """The first port of the OS's ephemeral range (Linux; 32768 when unknown)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def hash_password(password: str, *, iterations: int = 101) -> str:
    """mosquitto's `$7$` password hash (PBKDF2-HMAC-SHA512), as mosquitto_passwd writes."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """Write a mosquitto password file for `users` (name → clear-text password).

    Uses `mosquitto_passwd -b` when installed, otherwise writes the same hash format."""
    tool = shutil.which("mosquitto_passwd")
    path.write_text("", encoding="utf-8")
    path.chmod(0o600)
    if tool is not None:
        for user, password in users.items():
            subprocess.run(
                [tool, "-b", str(path), user, password],
                check=True,
                capture_output=True,
                timeout=10,
            )
        return
    path.write_text(
        "".join(f"{user}:{hash_password(pw)}\n" for user, pw in users.items()), encoding="utf-8"
    )


@dataclass(frozen=True)
class TlsListener:
    """A second listener with TLS: `cafile` verifies client certificates when
    `require_certificate` is true; `tls_version` is mosquitto's (tlsv1.2 or tlsv1.3)."""

    certfile: Path
    keyfile: Path
    cafile: Path
    require_certificate: bool = True
    tls_version: str = "tlsv1.2"
    #: More mosquitto.conf lines for this listener, e.g. ``("max_qos 1",
    #: "use_identity_as_username true")``.
    extra: tuple[str, ...] = ()


class BrokerError(RuntimeError):
    """The broker did not start (the message includes the tail of its log)."""


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1 and a free port, for one test.

    users: name → password; when given, anonymous clients are refused.
    acl: the text of an ACL file (mosquitto `acl_file` syntax).
    extra_config: more mosquitto.conf lines, e.g. ``["max_inflight_messages 1000"]``.
    persistent: keep sessions and queued messages across stop/start (saved on SIGTERM).
    tls: also listen with TLS on `tls_port` (another free port).
    log_types: mosquitto `log_type` values; "all" (default) logs every packet, which tests
        read back with `log_text()`; benchmarks pass ("error", "warning").
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        extra_config: Sequence[str] = (),
        log_types: Sequence[str] = ("all",),
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        persistent: bool = False,
        tls: TlsListener | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """die_with_parent: the broker gets SIGTERM when this process dies (for the
        benchmarks, whose runner a test's timeout may SIGKILL; start and restart it
        from the main thread then)."""
        self.host = "127.0.0.1"
        self._die_with_parent = die_with_parent
        self._tls = tls
        self._tls_port: int | None = None
        self._persistent = persistent
        self._binary = binary
        self._users = dict(users) if users else None
        self._acl = acl
        self._extra = list(extra_config)
        self._log_types = list(log_types)
        self._start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._paused = False

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        """The listening port (fixed for the broker's life, kept across restarts)."""
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def extra_config(self) -> list[str]:
        """The extra mosquitto.conf lines in use (see `reconfigure`)."""
        return list(self._extra)

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (needs `tls=`)."""
        if self._tls_port is None:
            raise RuntimeError("broker not started with a TLS listener")
        return self._tls_port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("broker not started")
        return self._dir / "mosquitto.log"

    def log_text(self) -> str:
        """Everything mosquitto logged so far (all restarts)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):
            return ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> MosquittoBroker:
        """Write the config and start mosquitto; returns once the port accepts connections."""
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="mosquitto-test-"))
            self._write_config()
        self._spawn()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then wait (SIGKILL if it does not exit in time). The port is kept."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self.resume()
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: connections die without a DISCONNECT, as in a crash."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._proc = None
        self._paused = False

    def restart(self) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop()
        self._spawn()

    def pause(self) -> None:
        """SIGSTOP: the broker holds its connections but answers nothing."""
        if self._proc is not None and self._proc.poll() is None and not self._paused:
            os.kill(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self._proc is not None and self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)
            self._paused = False

    def reload_users(self, users: Mapping[str, str]) -> None:
        """Replace the password file and make the running broker read it again (SIGHUP);
        connected clients stay connected, new logins are checked against `users`."""
        if self._dir is None or self._users is None or self._proc is None:
            raise RuntimeError("reload_users needs a started broker made with users=")
        self._users = dict(users)
        write_password_file(self._dir / "passwd", self._users)
        os.kill(self._proc.pid, signal.SIGHUP)

    def close(self) -> None:
        """Stop the broker and delete its directory. Safe to call more than once."""
        try:
            self.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> MosquittoBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def reconfigure(self, extra_config: Sequence[str]) -> None:
        """Replace the `extra_config` lines (same ports). A running broker re-reads its
        config (SIGHUP), where only what mosquitto.conf(5) marks "Reloaded on reload
        signal" takes effect; a stopped one uses it at its next start."""
        self._extra = list(extra_config)
        if self._dir is None:
            return
        self._write_config()
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGHUP)

    def _write_config(self) -> None:
        assert self._dir is not None
        if self._port is None:
            self._port = free_port(self.host)
        lines = [
            f"listener {self._port} {self.host}",
            *(
                ["persistence true", f"persistence_location {self._dir}/"]
                if self._persistent
                else ["persistence false"]
            ),
            f"log_dest file {self._dir / 'mosquitto.log'}",
            *(f"log_type {t}" for t in self._log_types),
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Keep root so mosquitto can read the files in our private directory.
            lines.append("user root")
        if self._users is not None:
            passwd = self._dir / "passwd"
            write_password_file(passwd, self._users)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self._acl is not None:
            acl = self._dir / "acl"
            acl.write_text(self._acl, encoding="utf-8")
            lines.append(f"acl_file {acl}")
        lines += self._extra
        if self._tls is not None:
            # Last: in mosquitto.conf the lines after `listener` configure that listener.
            if self._tls_port is None:
                self._tls_port = free_port(self.host)
            tls = self._tls
            lines += [
                f"listener {self._tls_port} {self.host}",
                f"cafile {tls.cafile}",
                f"certfile {tls.certfile}",
                f"keyfile {tls.keyfile}",
                f"require_certificate {'true' if tls.require_certificate else 'false'}",
                f"tls_version {tls.tls_version}",
                *tls.extra,
            ]
        (self._dir / "mosquitto.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _spawn(self, busy_until: float | None = None) -> None:
        assert self._dir is not None
        binary = self._binary or mosquitto_path()
        if binary is None:
            raise BrokerError("mosquitto is not installed")
        if busy_until is None:
            busy_until = time.monotonic() + _BUSY_RETRY_S
        stderr_path = self._dir / "stderr.log"
        with stderr_path.open("ab") as stderr:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self._dir / "mosquitto.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=die_with_parent if self._die_with_parent else None,
            )
        self._paused = False
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if self._proc.poll() is not None:
                err = stderr_path.read_text(encoding="utf-8", errors="replace")
                self._proc = None
                if "Address already in use" in self._log_tail(3) and time.monotonic() < busy_until:
                    # Held for a moment by another socket (a connection still closing):
                    # try again rather than fail a restart mid-test.
                    time.sleep(0.25)
                    self._spawn(busy_until)
                    return
                raise BrokerError(
                    f"mosquitto exited at start (port {self._port}): {err}\n{self._log_tail()}"
                )
            if self._port_open():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not listen on port {self._port} within "
                    f"{self._start_timeout_s} s\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((self.host, self.port)) == 0

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
