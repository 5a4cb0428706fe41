"""A real mosquitto on a free loopback port, for integration and end-to-end tests.

Usage (a fixture in a test module or a conftest)::

    with Broker(tmp_path / "broker") as broker:
        client.connect(broker.host, broker.port)
        ...
        broker.restart()  # same port; QoS 1 messages queued for offline sessions survive

The broker is configured like a production one (persistence on, a large per-client
queue) so that tests see what devices see.  Every process this module starts is
stopped by ``stop()``, by ``__exit__``, at interpreter exit (``atexit``) and, on
Linux, by the kernel if the test process dies without running either
(``PR_SET_PDEATHSIG``).

What survives ``restart()`` (mosquitto 2.0.11): sessions whose client's latest CONNECT
had Clean Start = 0 (v5, with a Session Expiry Interval) or clean session = false
(v3.1.1), with their subscriptions and queued QoS 1/2 messages.  A v5 session created
with Clean Start = 1 and an expiry interval outlives disconnects but NOT a restart.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["Broker", "BrokerError", "free_port", "mosquitto_available"]

START_TIMEOUT = 10.0
"""How long ``start()`` waits for the listener (seconds)."""

STOP_TIMEOUT = 10.0
"""How long ``stop()`` waits after SIGTERM before SIGKILL (seconds)."""

_BIND_RETRIES = 5
"""Fresh ports tried when another process takes ours between ``free_port()`` and bind."""

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """mosquitto could not be configured, started or stopped; the message has the log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _which(name: str) -> str | None:
    # /usr/sbin is often not on a non-root PATH, and that is where Debian puts mosquitto.
    found = shutil.which(name)
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def mosquitto_available() -> bool:
    """True when a ``mosquitto`` executable can be found (use it in ``pytest.mark.skipif``)."""
    return _which("mosquitto") is not None


# Brokers still running; stopped at interpreter exit if a test forgot to.
_LIVE: set[Broker] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for broker in brokers:
        with contextlib.suppress(Exception):
            broker.stop()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the parent thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Broker:
    """One mosquitto process with its config, data, log and certificates in ``workdir``.

    ``host``, ``port`` and ``ca_file`` are valid once ``start()`` returned.  The port is
    chosen at the first start and kept for every later ``start()``/``restart()``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = True,
        extra_config: Sequence[str] = (),
    ) -> None:
        """``users`` maps user names to passwords (anonymous access is then refused);
        ``acl`` is the text of a mosquitto ``acl_file``; ``extra_config`` lines are
        appended to the generated ``mosquitto.conf`` (mosquitto 2.0.11 accepts an
        option repeated there, read after the one this module wrote)."""
        self.workdir = Path(workdir).resolve()
        self.tls = tls
        self.users = dict(users) if users else None
        self.acl = acl
        self.persistence = persistence
        self.extra_config = list(extra_config)
        self.host = "127.0.0.1"
        self.port = 0
        self.ca_file: Path | None = None
        self.conf_file = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        self.data_dir = self.workdir / "data"
        self._pid_file = self.workdir / "broker.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: int | None = None
        self._prepared = False

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Broker {self.host}:{self.port} tls={self.tls} {state} workdir={self.workdir}>"

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the mosquitto process this object started is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The mosquitto process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> None:
        """Start mosquitto and return once its port accepts TCP connections.

        Raises ``BrokerError`` (with the log tail) if it exits or does not listen within
        ``START_TIMEOUT``.  A no-op if already running.
        """
        if self.running:
            return
        exe = _which("mosquitto")
        if exe is None:
            raise BrokerError("mosquitto not found (Debian: apt-get install mosquitto)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._kill_stale()
        if not self._prepared:
            self._prepare()
            self._prepared = True
        pinned = self.port != 0
        attempts = 1 if pinned else _BIND_RETRIES
        for attempt in range(attempts):
            if not pinned:
                self.port = free_port()
                self._write_config()
            try:
                self._spawn(exe)
                return
            except _AddressInUse:
                if attempt == attempts - 1:
                    raise BrokerError(
                        f"port {self.port} stayed in use; log tail:\n{self.log_tail()}"
                    ) from None

    def stop(self) -> None:
        """SIGTERM (mosquitto then saves its database), wait, SIGKILL if it hangs.

        Idempotent.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: a crash.  Only what the last autosave (1 s) wrote survives."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        self._reap()

    def restart(self) -> None:
        """``stop()`` then ``start()`` on the same port, with the same persistence file."""
        self.stop()
        self.start()

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines mosquitto wrote (stdout and stderr, across restarts)."""
        try:
            data = self.log_file.read_bytes()
        except FileNotFoundError:
            return "(no log yet)"
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    # -- internals -------------------------------------------------------------------

    def _spawn(self, exe: str) -> None:
        # Append: a restart keeps the earlier log, which is what a failing test wants to see.
        log = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        offset = os.fstat(log).st_size
        os.write(log, f"--- broker.py: starting on port {self.port}\n".encode())
        # The death signal fires when the *thread* that forked exits, so only use it from
        # the main thread (a fixture); other threads rely on stop()/atexit.
        in_main = threading.current_thread() is threading.main_thread()
        pdeathsig = sys.platform == "linux" and in_main
        try:
            self._proc = subprocess.Popen(
                [exe, "-c", str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C at the terminal goes to pytest, not here
                preexec_fn=_die_with_parent if pdeathsig else None,
            )
        except BaseException:
            os.close(log)
            raise
        self._log_handle = log
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._pid_file.write_text(f"{self._proc.pid}\n")
        self._wait_listening(self._proc, offset)

    def _wait_listening(self, proc: subprocess.Popen[bytes], log_offset: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = proc.poll()
            if code is not None:
                self._reap()
                log = self._log_since(log_offset)
                if "Address already in use" in log:
                    raise _AddressInUse
                raise BrokerError(
                    f"mosquitto exited with code {code} during start-up "
                    f"(config {self.conf_file}); log tail:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                pass
            else:
                # The port answers, and our process is alive: it is the one listening
                # (had another process held the port, ours would have failed to bind).
                if proc.poll() is None:
                    return
                continue
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not listen on {self.host}:{self.port} within "
                    f"{START_TIMEOUT:.0f}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _reap(self) -> None:
        self._proc = None
        if self._log_handle is not None:
            os.close(self._log_handle)
            self._log_handle = None
        self._pid_file.unlink(missing_ok=True)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _kill_stale(self) -> None:
        """Kill a mosquitto left running from this workdir by a test process that died."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            self._pid_file.unlink(missing_ok=True)
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []  # gone (or not Linux): nothing to kill
        # Only ours: the pid may have been reused by an unrelated process.
        if str(self.conf_file).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _pid_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._pid_file.unlink(missing_ok=True)

    def _prepare(self) -> None:
        """Write the files that do not depend on the port: data dir, passwords, ACL, certs."""
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self.users:
            self._write_passwords(self.users)
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl if self.acl.endswith("\n") else self.acl + "\n")
            acl_file.chmod(0o600)
        if self.tls:
            self.ca_file = _make_certificates(self.workdir / "tls")

    def _write_passwords(self, users: dict[str, str]) -> None:
        tool = _which("mosquitto_passwd")
        if tool is None:
            raise BrokerError("mosquitto_passwd not found (it ships with Debian's mosquitto)")
        passwd = self.workdir / "passwd"
        passwd.unlink(missing_ok=True)
        for i, (user, password) in enumerate(users.items()):
            if ":" in user:
                raise BrokerError(f"user name {user!r} must not contain ':'")
            create = ["-c"] if i == 0 else []
            _run("mosquitto_passwd", tool, *create, "-b", str(passwd), user, password)
        passwd.chmod(0o600)

    def _write_config(self) -> None:
        lines = [
            "# Written by tests/broker.py; rewritten at each start.",
            f"listener {self.port} {self.host}",
        ]
        if self.tls:
            tls_dir = self.workdir / "tls"
            lines += [
                f"cafile {tls_dir / 'ca.crt'}",
                f"certfile {tls_dir / 'server.crt'}",
                f"keyfile {tls_dir / 'server.key'}",
                "tls_version tlsv1.2",
            ]
        if os.geteuid() == 0:
            # As root, mosquitto would switch to the `mosquitto` user, which cannot
            # write into a test's private (0700) temp directory.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        lines += [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            # Seconds between saves; SIGTERM saves too.  Small, so a kill() loses little.
            "autosave_interval 1",
            "autosave_on_changes false",
            # Per client.  The default 1000 would drop jobs queued for an offline
            # daemon in a 1000-job burst.
            "max_queued_messages 100000",
            "max_queued_bytes 0",
            # The broker's outgoing QoS 1/2 window per client (mosquitto's default);
            # a v5 client's Receive Maximum lowers it further.
            "max_inflight_messages 20",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
            "connection_messages true",
        ]
        if self.users:
            lines += ["allow_anonymous false", f"password_file {self.workdir / 'passwd'}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            lines.append(f"acl_file {self.workdir / 'acl'}")
        lines += self.extra_config
        self.conf_file.write_text("\n".join(lines) + "\n")
        self.conf_file.chmod(0o600)


def _pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last ')' (comm may contain one).
    return stat.rpartition(")")[2].split()[0] != "Z"


class _AddressInUse(Exception):
    pass


def _run(what: str, *args: str) -> None:
    try:
        subprocess.run(args, check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        out = (exc.stdout + exc.stderr).decode("utf-8", "replace")
        raise BrokerError(f"{what} failed ({exc.returncode}): {out}") from None
    except subprocess.TimeoutExpired:
        raise BrokerError(f"{what} did not finish within 60s") from None


def _make_certificates(directory: Path) -> Path:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1; returns the CA.

    EC P-256 keys (fast to make).  The extensions are the ones strict verifiers
    (Python 3.13's ``VERIFY_X509_STRICT``) require: a critical CA basic constraint,
    key identifiers, and the names in the subjectAltName.
    """
    openssl = _which("openssl")
    if openssl is None:
        raise BrokerError("openssl not found; it is needed for tls=True")
    directory.mkdir(mode=0o700, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = [
        "basicConstraints=critical,CA:TRUE",
        "keyUsage=critical,keyCertSign,cRLSign",
        "subjectKeyIdentifier=hash",
    ]
    subject_ca = ("-subj", "/CN=edgeagent test CA")
    addext = [arg for e in ca_ext for arg in ("-addext", e)]
    _run("openssl (CA)", openssl, "req", "-x509", "-days", "7", *ec, *subject_ca, *addext,
         "-keyout", str(ca_key), "-out", str(ca_crt))  # fmt: skip
    _run("openssl (server request)", openssl, "req", "-new", *ec, "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(csr))  # fmt: skip
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _run("openssl (server certificate)", openssl, "x509", "-req", "-in", str(csr),
         "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(crt), "-days", "7", "-extfile", str(ext))  # fmt: skip
    for path in (ca_key, key):
        path.chmod(0o600)
    return ca_crt
