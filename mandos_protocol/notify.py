# SPDX-License-Identifier: GPL-3.0-or-later
"""sd_notify for a ``Type=notify`` service: the server's and the resident agent's (``--watch``).

``NOTIFY_SOCKET`` (and the watchdog's ``WATCHDOG_USEC``/``WATCHDOG_PID``) are read once and
removed from the environment, so that the processes started later (checkers, gpg, gpg-agent)
do not inherit them, as ``sd_notify(1, ...)`` does.  Without ``NOTIFY_SOCKET`` every call does
nothing.  The agent imports this only when resident: ``sdnotify`` is pure Python.
"""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    """sd_notify for a Type=notify service; does nothing when ``NOTIFY_SOCKET`` is unset."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        os.environ.pop("NOTIFY_SOCKET", None)
        self.watchdog_interval = self._watchdog_interval()

    @staticmethod
    def _watchdog_interval() -> float | None:
        """Half of ``WATCHDOG_USEC`` in seconds, when the watchdog is meant for us."""
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        try:
            if not usec or (pid and int(pid) != os.getpid()):
                return None
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def notify(self, *assignments: str) -> None:
        if self._notifier is not None:
            text = "\n".join(assignments)
            self._notifier.notify(text.encode("latin-1", errors="replace").decode("latin-1"))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=Stopping")
