# SPDX-License-Identifier: GPL-3.0-or-later
"""Our own server as a peer: ``mandos-server`` as a subprocess in a temporary config and state
directory, a journal sink that parses the native journal protocol, and a small Mandos client on
our own GnuTLS binding for fast checks of "got the blob / got nothing" (the real mandos-client
covers interop)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from mandos_protocol.client import exchange_blob
from mandos_protocol.gnutls import Credentials, Priority
from peers.leaks import WATCH
from peers.process import stop_process
from peers.upstream import KeySet, free_port, listening_ports

SERVER = [sys.executable, "-m", "server"]
REPO = Path(__file__).resolve().parent.parent


def parse_native(data: bytes) -> dict[str, str]:
    """One native-protocol journal datagram as a dict (both the ``KEY=VALUE`` and the
    binary-safe ``KEY\\n<le64><bytes>\\n`` forms)."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        line = data[position:newline]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            position = newline + 1
        else:
            (size,) = struct.unpack("<Q", data[newline + 1:newline + 9])
            start = newline + 9
            fields[line.decode()] = data[start:start + size].decode()
            position = start + size + 1
    return fields


class JournalSink:
    """An AF_UNIX datagram socket standing in for journald's, collecting entries."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal.socket"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.socket.settimeout(0.1)
        self.entries: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while self._running:
            try:
                data = self.socket.recv(65536)
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.raw.append(data)
                self.entries.append(parse_native(data))

    def find(self, event: str, **fields: str) -> list[dict[str, str]]:
        with self._lock:
            return [e for e in self.entries if e.get("MANDOS_EVENT") == event
                    and all(e.get(k) == v for k, v in fields.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = 10.0,
                 **fields: str) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, **fields)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                with self._lock:
                    seen = [(e.get("MANDOS_EVENT"), e.get("MESSAGE")) for e in self.entries]
                raise AssertionError(f"no {count}x {event} {fields} within {timeout} s; "
                                     f"saw {seen}")
            time.sleep(0.02)

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self.socket.close()
        with self._lock:
            WATCH.scan("journal entries", f"journal sink {self.path}", b"".join(self.raw))


class OurServer:
    """``mandos-server`` in a temporary config and state directory, with a journal sink;
    in the network namespace ``netns`` if given."""

    def __init__(self, clients: str, *, address: str = "127.0.0.1", ipv6: bool = False,
                 port: int | None = None, extra_args: Sequence[str] = (),
                 directory: Path | None = None, use_dbus: bool = False,
                 netns: str | None = None) -> None:
        self.owns_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="mandos-test-server-"))
        self.configdir = self.directory / "conf"
        self.statedir = self.directory / "state"
        self.configdir.mkdir(exist_ok=True)
        self.statedir.mkdir(mode=0o700, exist_ok=True)
        self.address = address
        self.ipv6 = ipv6
        # Inside a fresh network namespace nothing else listens; any port will do.
        self.port = port or (free_port(address) if netns is None
                             else 49152 + os.getpid() % 10000)
        self.netns = netns  # run via ip netns exec (it execs: the pid stays the server's)
        self.extra_args = list(extra_args)
        self.use_dbus = use_dbus  # D-Bus admin API on (give DBUS_SYSTEM_BUS_ADDRESS in env)
        self.write_clients(clients)
        self.journal: JournalSink | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.directory / "stderr"

    def write_clients(self, clients: str) -> None:
        (self.configdir / "clients.conf").write_text(clients)

    @property
    def connect(self) -> str:
        return f"{self.address}:{self.port}"

    def argv(self) -> list[str]:
        argv = [*SERVER, f"--configdir={self.configdir}", f"--statedir={self.statedir}",
                f"--address={self.address}", f"--port={self.port}", "--no-zeroconf",
                "--debuglevel=DEBUG"]
        if not self.use_dbus:
            argv.append("--no-dbus")
        if not self.ipv6:
            argv.append("--no-ipv6")
        argv += self.extra_args
        return argv if self.netns is None else ["ip", "netns", "exec", self.netns, *argv]

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None,
              pass_fds: Sequence[int] = (), cwd: Path = REPO) -> OurServer:
        """Start the server (``env``: extra environment variables; ``cwd``: its working
        directory, where a core file would go) and, with ``wait``, wait until it listens and
        has logged server-started to the journal sink (or, when ``--journal-socket`` is among
        the extra arguments, until it listens)."""
        if self.journal is None:
            self.journal = JournalSink(self.directory)
        env = {**os.environ, "MANDOS_JOURNAL_SOCKET": str(self.journal.path),
               "PYTHONPATH": str(REPO), **(env or {})}
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                            stdout=stderr, stderr=stderr, env=env, cwd=cwd,
                                            pass_fds=pass_fds)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 10.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.port not in listening_ports(self.process.pid):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not listen: {self.stderr()}")
            time.sleep(0.02)
        assert self.journal is not None
        if not any(arg.startswith("--journal-socket") for arg in self.extra_args):
            self.journal.wait_for("server-started")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status.  A server still running after ``timeout``
        is killed, and fails the test."""
        if self.process is None:
            return 0
        process, self.process = self.process, None
        status = stop_process(process, timeout)
        if status is None:
            raise AssertionError(f"the server ignored SIGTERM for {timeout:g} s and was killed:\n"
                                 + self.stderr())
        return status

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            WATCH.scan_file("log", self.stderr_path)
            WATCH.scan_tree("state file", self.statedir)
            if self.owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> OurServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def fetch(keys: KeySet, address: str, port: int, timeout: float = 5.0) -> bytes:
    """Ask the server for the blob as a Mandos client would (protocol line, TLS as the TLS
    server with the raw public key), and return what it sent (b"" for a refusal)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, \
            Credentials.raw_public_key_files(keys.tls_pubkey, keys.tls_privkey) as creds, \
            Priority() as priority:
        sock.settimeout(timeout)
        sock.connect((address, port))
        return exchange_blob(sock, creds, priority, timeout=timeout)


def clients_conf(*sections: str, defaults: str = "checker = /bin/true\n") -> str:
    """A clients.conf with a [DEFAULT] section and ``sections``."""
    return "[DEFAULT]\n" + defaults + "\n" + "\n".join(sections)


def set_options(section: str, **options: str) -> str:
    """``section`` (one client) with ``options`` added after its header."""
    header, _, rest = section.partition("\n")
    extra = "".join(f"{key} = {value}\n" for key, value in options.items())
    return f"{header}\n{extra}{rest}"
