# SPDX-License-Identifier: GPL-3.0-or-later
"""Debian's real upstream Mandos 1.8 programs as test peers.

* :func:`make_upstream_keys` runs ``mandos-keygen`` to make a key set (RSA-4096 OpenPGP plus an
  Ed25519 TLS key; a few seconds, so share one per session where possible).
* :func:`upstream_section` runs ``mandos-keygen --passfile`` to make a ``clients.conf`` section
  whose ``secret`` is an OpenPGP blob of the password; :func:`section_secret` decodes it.
* :class:`UpstreamServer` runs the real ``mandos`` server on loopback (or in a network
  namespace) with a private system D-Bus, in its own process group so that every process it
  forks dies with it.
* :func:`run_upstream_client` runs the real ``mandos-client`` against ``--connect``.

Upstream's server opens the system D-Bus even with ``--no-dbus``, so it always gets a private
``dbus-daemon`` (never the host's bus), and it drops privileges to ``_mandos``, so its state
directory is writable by that user.  ``mandos-client`` retries a refusal forever: it runs under
a timeout.
"""

from __future__ import annotations

import ast
import base64
import collections
import configparser
import datetime
import functools
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers.dbus import PrivateSystemBus
from peers.leaks import WATCH
from peers.process import StartStop

MANDOS = "/usr/sbin/mandos"
MANDOS_KEYGEN = "/usr/sbin/mandos-keygen"
MANDOS_CTL = "/usr/sbin/mandos-ctl"
MANDOS_CLIENT = "/usr/lib/x86_64-linux-gnu/mandos/plugins.d/mandos-client"

#: Upstream's D-Bus name.
BUS_NAME = "se.recompile.Mandos"

#: The user upstream's server drops privileges to.
MANDOS_USER = "_mandos"

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0


def _spki_der_from_pem(pem: bytes) -> bytes:
    """The DER body of a ``-----BEGIN PUBLIC KEY-----`` PEM file."""
    lines = pem.decode("ascii").strip().splitlines()
    body = [line for line in lines if line and not line.startswith("-----")]
    return base64.b64decode("".join(body))


@dataclass(frozen=True)
class KeySet:
    """The four key files ``mandos-keygen`` writes into one directory, and the TLS key id."""

    directory: Path
    pubkey: Path
    seckey: Path
    tls_pubkey: Path
    tls_privkey: Path
    key_id: str

    @classmethod
    def in_directory(cls, directory: Path | str) -> KeySet:
        """The key set in ``directory``; the key id is the upper-case hex SHA-256 of the DER
        SubjectPublicKeyInfo in ``tls-pubkey.pem`` (what upstream's server computes)."""
        directory = Path(directory)
        tls_pubkey = directory / "tls-pubkey.pem"
        der = _spki_der_from_pem(tls_pubkey.read_bytes())
        for private in ("seckey.txt", "tls-privkey.pem"):
            WATCH.private_key_file(f"{directory}/{private}", directory / private)
        return cls(
            directory=directory,
            pubkey=directory / "pubkey.txt",
            seckey=directory / "seckey.txt",
            tls_pubkey=tls_pubkey,
            tls_privkey=directory / "tls-privkey.pem",
            key_id=hashlib.sha256(der).hexdigest().upper(),
        )

    def client_options(self) -> list[str]:
        """The four key options, spelled as upstream's ``mandos-client`` (and our agent) take
        them."""
        return [f"--pubkey={self.pubkey}", f"--seckey={self.seckey}",
                f"--tls-pubkey={self.tls_pubkey}", f"--tls-privkey={self.tls_privkey}"]


def make_upstream_keys(directory: Path, name: str) -> KeySet:
    """Run upstream's ``mandos-keygen --dir DIRECTORY --name NAME`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([MANDOS_KEYGEN, "--dir", str(directory), "--name", name],
                   check=True, capture_output=True, timeout=120)
    return KeySet.in_directory(directory)


def upstream_section(keys: KeySet, name: str, password: bytes) -> str:
    """The ``clients.conf`` section upstream's keygen writes for ``keys``, with ``password``
    encrypted into ``secret``.

    The password goes through a file in a private 0700 directory, never through argv or the
    environment.  The key id the keygen prints is checked against :attr:`KeySet.key_id`.
    """
    private = Path(tempfile.mkdtemp(prefix="mandos-test-pass-"))
    try:
        private.chmod(0o700)
        passfile = private / "password"
        descriptor = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(password)
        result = subprocess.run(
            [MANDOS_KEYGEN, "--dir", str(keys.directory), "--name", name,
             "--passfile", str(passfile), "--no-ssh"],
            check=True, capture_output=True, timeout=120,
        )
    finally:
        shutil.rmtree(private, ignore_errors=True)
    section = result.stdout.decode()
    printed = _parse_section(section).get("key_id", "")
    if printed.upper().replace(" ", "") != keys.key_id:
        raise AssertionError(f"mandos-keygen printed key_id {printed!r}, expected {keys.key_id}")
    WATCH.password(name, password)
    WATCH.blob(name, section_secret(section))
    return section


def _parse_section(section: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(section)
    names = parser.sections()
    if len(names) != 1:
        raise ValueError(f"expected one clients.conf section, got {names}")
    return parser[names[0]]


def section_secret(section: str) -> bytes:
    """The blob a server sends for this section: the base64-decoded ``secret``."""
    return base64.b64decode("".join(_parse_section(section)["secret"].split()))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (in this network namespace)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of process ``pid``."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def kill_process_group(process: subprocess.Popen[bytes], *, graceful: bool = True,
                       timeout: float = _STOP_TIMEOUT) -> None:
    """End the process group led by ``process`` (started with ``start_new_session``): SIGTERM
    first when ``graceful``, SIGKILL for whatever is left after ``timeout``; reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL) if graceful else (signal.SIGKILL,):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; forked children may linger in the group.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
    process.wait()


class UpstreamServer(StartStop):
    """Debian's real ``mandos`` server, in the foreground, for the duration of a ``with``.

    ``clients`` is the text of ``clients.conf`` sections (from :func:`upstream_section` or
    written by hand); a ``[DEFAULT]`` with ``checker = <checker>`` is put before them unless
    ``checker`` is None.  The server listens on ``address:port`` (``port`` chosen free when None;
    IPv6 unless the address is IPv4), without Zeroconf and without its D-Bus API unless asked.
    It always gets a private system bus (:attr:`bus`), because upstream opens the system bus even
    with ``--no-dbus``; pass ``bus`` to share one.  ``netns`` runs it via ``ip netns exec``.

    Upstream drops privileges to ``_mandos``: the state directory is owned by it and the
    temporary directories are traversable.  A ``secfile`` must be readable by ``_mandos``.
    Everything the server prints (``debug=True`` makes it print its log) lands in
    :attr:`log_path`; :meth:`log_text` reads it.

    On exit the server is killed with SIGKILL, which is fast (upstream spends about 1.7 s on a
    SIGTERM, encrypting its state with gpg, whose agent escapes the process group).  With
    ``graceful_stop=True`` it gets SIGTERM and writes its state file, for tests about that.
    """

    def __init__(self, clients: str, *, address: str | None = "127.0.0.1",
                 port: int | None = None, checker: str | None = "/bin/true",
                 use_dbus: bool = False, zeroconf: bool = False, interface: str | None = None,
                 netns: str | None = None, bus: PrivateSystemBus | None = None,
                 debug: bool = False, graceful_stop: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        self.clients = clients
        self.address = address
        self.ipv6 = address is None or ":" in address
        if port is None:
            # Inside a fresh network namespace nothing else listens; any port will do.
            port = free_port(address or "::") if netns is None else 49152 + os.getpid() % 10000
        self.port = port
        self.checker = checker
        self.use_dbus = use_dbus
        self.zeroconf = zeroconf
        self.interface = interface
        self.netns = netns
        self.debug = debug
        self.graceful_stop = graceful_stop
        self.extra_args = list(extra_args)
        self._own_bus = bus is None
        self.bus = bus if bus is not None else PrivateSystemBus()
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-upstream-"))
        self.configdir = self.directory / "conf"
        self.statedir = self.directory / "state"
        self.log_path = self.directory / "mandos.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def connect(self) -> str:
        """``ADDRESS:PORT`` as ``mandos-client --connect`` takes it (the last colon splits)."""
        return f"{self.address or '127.0.0.1'}:{self.port}"

    def argv(self) -> list[str]:
        argv = [MANDOS, "--foreground", "--no-restore", f"--port={self.port}",
                f"--configdir={self.configdir}", f"--statedir={self.statedir}"]
        if self.address is not None:
            argv.append(f"--address={self.address}")
        if not self.ipv6:
            argv.append("--no-ipv6")
        if not self.use_dbus:
            argv.append("--no-dbus")
        if not self.zeroconf:
            argv.append("--no-zeroconf")
        if self.interface is not None:
            argv.append(f"--interface={self.interface}")
        if self.debug:
            argv.append("--debug")
        argv += self.extra_args
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def start(self) -> UpstreamServer:
        try:
            user = pwd.getpwnam(MANDOS_USER)
            self.directory.chmod(0o755)
            self.configdir.mkdir(mode=0o755)
            self.statedir.mkdir(mode=0o700)
            os.chown(self.statedir, user.pw_uid, user.pw_gid)
            defaults = f"[DEFAULT]\nchecker = {self.checker}\n\n" if self.checker else ""
            (self.configdir / "clients.conf").write_text(defaults + self.clients)
            (self.configdir / "mandos.conf").write_text("[DEFAULT]\n")
            if self._own_bus:
                self.bus.start()
            # Upstream's multiprocessing leaves pymp-* directories in TMPDIR when killed: keep
            # them in ours, which goes with the rest.
            tmpdir = self.directory / "tmp"
            tmpdir.mkdir(mode=0o700)
            os.chown(tmpdir, user.pw_uid, user.pw_gid)
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**self.bus.environment(), "TMPDIR": str(tmpdir)},
                    start_new_session=True,
                )
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while self.port not in listening_ports(self.process.pid):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"upstream mandos exited with status {self.process.returncode}:\n"
                    + self.log_text()
                )
            if time.monotonic() > deadline:
                raise RuntimeError("upstream mandos did not listen in time:\n" + self.log_text())
            time.sleep(0.02)
        # It listens before it takes its D-Bus name; mandos-ctl needs the name.
        while self.use_dbus and not self._owns_bus_name():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("upstream mandos took no D-Bus name:\n" + self.log_text())
            time.sleep(0.02)

    def _owns_bus_name(self) -> bool:
        result = subprocess.run(
            ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
             f"string:{BUS_NAME}"],
            env=self.bus.environment(), capture_output=True, text=True, timeout=10,
        )
        return "boolean true" in result.stdout

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            kill_process_group(self.process, graceful=self.graceful_stop)
            self.process = None
        if self._own_bus:
            self.bus.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def upstream_client_argv(keys: KeySet, connect: str | None, hook_dir: Path, *,
                         interface: str = "none", netns: str | None = None,
                         extra_args: Sequence[str] = ()) -> list[str]:
    """The command line of upstream's ``mandos-client``; ``hook_dir`` should be an empty
    directory (so that no network hook of the host runs)."""
    argv = [MANDOS_CLIENT]
    if connect is not None:
        argv.append(f"--connect={connect}")
    argv += [f"--interface={interface}", f"--network-hook-dir={hook_dir}",
             *keys.client_options(), *extra_args]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return argv


def run_upstream_client(keys: KeySet, connect: str | None, timeout: float, *,
                        interface: str = "none", netns: str | None = None,
                        extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run upstream's ``mandos-client`` until it prints a password, or ``timeout`` seconds pass.

    Upstream retries forever when refused, so it runs under ``timeout`` (exit status 124 then).
    On success ``stdout`` is the decrypted password, without a trailing newline.
    """
    hook_dir = Path(tempfile.mkdtemp(prefix="mandos-test-hooks-"))
    try:
        argv = upstream_client_argv(keys, connect, hook_dir, interface=interface, netns=netns,
                                    extra_args=extra_args)
        return subprocess.run(
            ["timeout", "--kill-after=1", str(timeout), *argv],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 10,
        )
    finally:
        shutil.rmtree(hook_dir, ignore_errors=True)


def upstream_functions(*names: str) -> dict[str, Callable[..., Any]]:
    """Pure functions copied out of upstream's ``/usr/sbin/mandos`` (for example
    ``string_to_delta``), for differential tests against the real implementation.

    Importing the whole server needs D-Bus, GLib and Avahi bindings; these few functions need
    only the standard library, so their source is taken from the file and run on its own.
    The file is read at the first call, not here: collecting a test module that compares with
    upstream (as ``-m unit`` does before it deselects) needs no upstream installed.
    """
    @functools.cache
    def load() -> dict[str, Callable[..., Any]]:
        tree = ast.parse(Path(MANDOS).read_text())
        wanted: list[ast.stmt] = [node for node in tree.body
                                  if isinstance(node, ast.FunctionDef) and node.name in names]
        missing = set(names) - {node.name for node in wanted
                                if isinstance(node, ast.FunctionDef)}
        if missing:
            raise LookupError(f"{MANDOS} defines no {sorted(missing)}")
        namespace: dict[str, Any] = {"collections": collections, "datetime": datetime,
                                     "re": re}
        exec(compile(ast.Module(body=wanted, type_ignores=[]), MANDOS, "exec"), namespace)
        return {name: namespace[name] for name in names}

    def deferred(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return load()[name](*args, **kwargs)
        call.__name__ = call.__qualname__ = name
        return call

    return {name: deferred(name) for name in names}
