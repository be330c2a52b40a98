"""The systemd service protocol's inherited sockets (LISTEN_FDS); sd_notify is
:mod:`mandos_protocol.notify`, which the agent uses too.

The environment is read once at start-up and then removed, so that checker processes do not
inherit ``LISTEN_*`` (as ``sd_listen_fds(1)`` does).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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
