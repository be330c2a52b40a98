"""sd_notify for ``--watch`` (``Type=notify`` in the initramfs): ``READY=1`` once warm,
``STATUS=`` lines, ``STOPPING=1`` on the way out.

Only ``--watch`` imports this module (through ``sdnotify``, pure Python).  ``NOTIFY_SOCKET`` is
read once and removed from the environment, so that gpg and gpg-agent, started later, do not
inherit it.  Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    """The connection to the service manager's notification socket, if there is one."""

    def __init__(self) -> None:
        self._notifier = (sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET")
                          else None)
        os.environ.pop("NOTIFY_SOCKET", None)

    def notify(self, *assignments: str) -> None:
        """Send ``assignments`` (``"READY=1"``, ``"STATUS=…"``) in one datagram."""
        if self._notifier is not None:
            self._notifier.notify("\n".join(assignments))
