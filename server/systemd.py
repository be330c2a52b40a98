# SPDX-License-Identifier: GPL-3.0-or-later
"""Socket activation: the listening sockets the service manager passes (``mandos.socket``).

libsystemd's ``sd_listen_fds(3)``, through pystemd, reads ``LISTEN_FDS`` (only if
``LISTEN_PID`` is ours), marks the sockets close-on-exec and removes the variables from the
environment, so that checker processes do not inherit them.  (Importing pystemd costs 25 ms at
start-up; it is imported with the module all the same, so that a package missing it fails
its import test, not its first socket-activated start.)

The rest of the service protocol is not pystemd's here, on purpose:

* sd_notify is :mod:`mandos_protocol.notify` (sdnotify, pure Python), which the resident agent
  uses too and which must not need a compiled library in the initramfs; pystemd's ``notify``
  would also need ``NOTIFY_SOCKET`` left in the environment for every later ``STATUS=`` and
  ``WATCHDOG=1``, for every checker and approval command to inherit.
* The journal is written by :mod:`server.journal` over the native protocol, not with
  ``pystemd.journal.sendv``: libsystemd's ``sd_journal_sendv`` always writes to
  ``/run/systemd/journal/socket`` (the tests point the server at a socket of their own), and
  pystemd drops its return value, so a server whose journald is gone could not fall back to
  stderr; it also cuts a value at its first NUL byte.
"""

from __future__ import annotations

import os
import socket

import pystemd.daemon

from server.config import ConfigError

_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def listen_fds() -> list[socket.socket]:
    """The sockets passed with ``LISTEN_FDS`` for this process, close-on-exec; [] if none.
    :class:`ConfigError` if the variables name descriptors that are not open."""
    if "LISTEN_FDS" not in os.environ:
        return []
    count = pystemd.daemon.listen_fds(True)
    for name in _VARIABLES:  # sd_listen_fds unset them in C; os.environ is Python's copy
        os.environ.pop(name, None)
    if count < 0:
        raise ConfigError(f"socket activation (LISTEN_FDS): {os.strerror(-count)}")
    return [socket.socket(fileno=pystemd.daemon.LISTEN_FDS_START + index)
            for index in range(count)]
