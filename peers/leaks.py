# SPDX-License-Identifier: GPL-3.0-or-later
"""The secret scan: the secrets that the tests hand to the programs, and the places where they
must never show up.

Secrets are registered where the tests make them (:func:`peers.upstream.upstream_section`
registers the password and its blob, :meth:`KeySet.in_directory` the private keys).  The
places are scanned as the tests go: the peers scan the logs, journal entries and state files
of the programs they ran when they stop them, a conftest hook scans every test's captured
output, and :class:`ProcessSampler` reads the argv and environment of every process on the
machine several times a second.  ``tests/test_secret_scan.py`` runs last and fails on any
finding.

A secret is looked for as it would leak: a password or a blob as its bytes, and a middle part
of it as ``%r`` and ``.hex()`` would print it; a blob also as one base64 string (how a JSON
file would carry it); a private key as two of the base64 lines of its PEM or ASCII-armoured
file (any copy of the key contains them).
"""

from __future__ import annotations

import base64
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Shorter "secrets" would match by chance.
MIN_NEEDLE = 8


@dataclass(frozen=True)
class Leak:
    """``secret`` (its label) was found in ``where`` (a kind of place and which one)."""

    secret: str
    kind: str
    where: str


class SecretWatch:
    """Registered secrets, what was scanned (counted by kind) and what was found."""

    def __init__(self) -> None:
        self._needles: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self.scanned: Counter[str] = Counter()
        self.leaks: list[Leak] = []

    def _add(self, label: str, needle: bytes) -> None:
        if len(needle) >= MIN_NEEDLE:
            with self._lock:
                self._needles.setdefault(bytes(needle), label)

    def _add_bytes(self, label: str, value: bytes) -> None:
        """``value`` itself, and as a log's ``%r`` or ``.hex()`` would spell a middle part."""
        self._add(label, value)
        middle = value[len(value) // 2 - 12:len(value) // 2 + 12] if len(value) > 24 else value
        self._add(f"{label} (repr)", repr(middle)[2:-1].encode())
        self._add(f"{label} (hex)", middle.hex().encode())

    def password(self, label: str, password: bytes) -> None:
        self._add_bytes(f"password {label}", password)

    def blob(self, label: str, blob: bytes) -> None:
        self._add_bytes(f"blob {label}", blob)
        self._add(f"blob {label} (base64)", base64.b64encode(blob))

    def private_key_file(self, label: str, path: Path) -> None:
        """Two base64 body lines of a PEM or ASCII-armoured private key file, if it exists."""
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            return
        body = [line.strip() for line in lines
                if len(line.strip()) >= 40 and b":" not in line and not line.startswith(b"-")]
        for line in body[1:2] + body[len(body) // 2:len(body) // 2 + 1]:
            self._add(f"private key {label}", line)

    def summary(self) -> str:
        """One line: how many secrets, what was scanned, how many findings."""
        with self._lock:
            scanned = ", ".join(f"{count} {kind}" for kind, count in sorted(self.scanned.items()))
            return (f"{len(self._needles)} secret patterns; scanned {scanned or 'nothing'};"
                    f" {len(self.leaks)} found")

    def scan(self, kind: str, where: str, data: bytes) -> None:
        """Count ``data`` as scanned ``kind`` and record every registered secret in it."""
        with self._lock:
            needles = list(self._needles.items())
            self.scanned[kind] += 1
        found = [Leak(label, kind, where) for needle, label in needles if needle in data]
        if found:
            with self._lock:
                self.leaks.extend(found)

    def scan_file(self, kind: str, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError:
            return
        self.scan(kind, str(path), data)

    def scan_tree(self, kind: str, directory: Path) -> None:
        """Every regular file under ``directory`` (state directories: small)."""
        if directory.is_dir():
            for path in sorted(directory.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    self.scan_file(kind, path)


#: The one watch of a test session.
WATCH = SecretWatch()


class ProcessSampler:
    """Reads ``/proc/*/cmdline`` of every process every ``interval`` seconds, and
    ``/proc/*/environ`` whenever a process (or a new image of it after ``execve``) is seen for
    the first time, and scans both with :data:`WATCH`.  Sampling misses a process shorter than
    the interval; what it sees is counted (``argv``, ``environment``)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._seen: set[tuple[str, bytes]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="secret-scan", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes()
                if (entry.name, argv) in self._seen or not argv:
                    continue
                environment = (entry / "environ").read_bytes()
            except OSError:
                continue  # gone, or a kernel thread
            self._seen.add((entry.name, argv))
            where = argv.replace(b"\0", b" ").decode(errors="replace")[:200]
            WATCH.scan("argv", f"pid {entry.name}: {where}", argv)
            WATCH.scan("environment", f"pid {entry.name}: {where}", environment)
