# SPDX-License-Identifier: GPL-3.0-or-later
"""A real ``systemd-journald`` for one test, in a private mount namespace.

There is no PID-1 systemd (and no journald) on the build machines, and a test must not write to a
host journal anyway.  So journald runs under ``unshare -m --propagation private`` with tmpfs
mounted on ``/run/systemd``, ``/run/log`` and ``/var/log/journal`` *inside* that namespace
(journald binds its sockets there itself within some 30 ms).  From outside, its sockets and
files are reachable through ``/proc/<pid>/root``: :attr:`PrivateJournal.socket_path` is the
native-protocol socket to give to the code under test, :meth:`PrivateJournal.entries` reads
the journal back with ``journalctl --directory``.  Programs that hardcode
``/run/systemd/journal/socket`` can run inside the namespace via :meth:`PrivateJournal.inside`.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peers.leaks import WATCH
from peers.process import StartStop, stop_process

JOURNALD = "/lib/systemd/systemd-journald"

_START_TIMEOUT = 10.0

_SCRIPT = (
    "set -e; for d in /run/systemd /run/log /var/log/journal; do mkdir -p $d; "
    "mount -t tmpfs -o mode=0755 tmpfs $d; done; exec " + JOURNALD
)


class PrivateJournal(StartStop):
    """``systemd-journald`` in its own mount namespace, stopped and gone after the ``with``."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        # Kept open while journald runs (it may write a lot: not a pipe), closed by stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the private journal is not running")
        return self.process.pid

    @property
    def root(self) -> Path:
        """The namespace's view of ``/``, seen from outside."""
        return Path(f"/proc/{self.pid}/root")

    @property
    def socket_path(self) -> Path:
        """The native journal socket (``/run/systemd/journal/socket`` inside)."""
        return self.root / "run/systemd/journal/socket"

    @property
    def syslog_path(self) -> Path:
        """The syslog socket journald offers (``/run/systemd/journal/dev-log`` inside)."""
        return self.root / "run/systemd/journal/dev-log"

    @property
    def directory(self) -> Path:
        return self.root / "run/log/journal"

    def start(self) -> PrivateJournal:
        # unshare (without --fork) and sh both exec, so the pid is journald's own.
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", _SCRIPT],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while not self.socket_path.is_socket():
                if self.process.poll() is not None:
                    self._stderr.seek(0)
                    stderr = self._stderr.read()
                    raise RuntimeError(f"journald exited: {stderr.decode(errors='replace')}")
                if time.monotonic() > deadline:
                    raise RuntimeError("journald did not create its socket in time")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        return self

    def inside(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in journald's mount namespace (where
        ``/run/systemd/journal/socket`` is this journal)."""
        return ["nsenter", "-t", str(self.pid), "-m", "--", *argv]

    def entries(self, *args: str, **matches: str) -> list[dict[str, Any]]:
        """Journal entries (``journalctl -o json``), filtered by ``FIELD=value`` matches and any
        extra journalctl ``args`` (for example ``"-t", "mandos"``).  Kernel messages (journald
        imports the ring buffer as root) and journald's own are left out."""
        argv = ["journalctl", f"--directory={self.directory}", "-o", "json", "--no-pager",
                *args, *(f"{field}={value}" for field, value in matches.items())]
        output = subprocess.run(argv, check=True, capture_output=True, timeout=30).stdout
        entries = [json.loads(line) for line in output.decode().splitlines() if line.strip()]
        return [e for e in entries if e.get("_TRANSPORT") not in ("kernel", "driver", "audit")]

    def wait_for(self, *args: str, count: int = 1, timeout: float = 5.0,
                 **matches: str) -> list[dict[str, Any]]:
        """Poll :meth:`entries` until at least ``count`` match (journald stores asynchronously
        after a send returns); returns them, or raises AssertionError with what was there."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.entries(*args, **matches)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} journal entries matching {matches} {args}, got {found}"
                )
            time.sleep(0.05)

    def _scan_for_secrets(self) -> None:
        """Every entry, every field (``-o export``), for the secret scan."""
        result = subprocess.run(["journalctl", f"--directory={self.directory}", "-o", "export",
                                 "--no-pager"], capture_output=True, timeout=30)
        WATCH.scan("journal entries", f"private journald {self.pid}", result.stdout)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self._scan_for_secrets()
        stop_process(self.process)
        self._stderr.close()
        # The tmpfs mounts vanish with the last process of the namespace.
        self.process = None
