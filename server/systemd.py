"""The systemd service protocol: inherited sockets (LISTEN_FDS) and sd_notify.

Both read their environment once at start-up and then remove it, so that checker processes do
not inherit ``LISTEN_*`` or ``NOTIFY_SOCKET`` (as ``sd_listen_fds(1)`` and
``sd_notify(1, ...)`` do).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import sdnotify

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class InheritedSocket:
    """A socket passed by the service manager, and its name (``FileDescriptorName=``)."""

    socket: socket.socket
    name: str


def listen_fds(environ: dict[str, str] | None = None) -> list[InheritedSocket]:
    """The sockets passed with ``LISTEN_FDS`` (only if ``LISTEN_PID`` is ours or unset), marked
    close-on-exec; the variables are removed from the environment."""
    env = os.environ if environ is None else environ
    count = env.pop("LISTEN_FDS", "")
    pid = env.pop("LISTEN_PID", "")
    names_text = env.pop("LISTEN_FDNAMES", "")
    if not count:
        return []
    try:
        number = int(count)
        if pid and int(pid) != os.getpid():
            return []
    except ValueError:
        return []
    names = names_text.split(":") if names_text else []
    sockets = []
    for index in range(number):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) else "unknown"
        sockets.append(InheritedSocket(socket.socket(fileno=fd), name))
    return sockets


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
