# SPDX-License-Identifier: GPL-3.0-or-later
"""Answering a request: one datagram ``+password`` to the request's ``Socket``.

The requester (systemd 252) accepts it only from uid 0, as the kernel reports it through
SO_PASSCRED; the datagram buffer is ours and is zeroed after sending.
"""

from __future__ import annotations

import socket

from password_agent.errors import AgentError

_SEND_TIMEOUT = 5.0


def send_password(socket_path: str, password: bytes | bytearray) -> None:
    """Send ``+`` and ``password`` to ``socket_path`` as one datagram."""
    datagram = bytearray(len(password) + 1)
    try:
        datagram[0] = ord("+")
        datagram[1:] = password
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as connection:
            connection.settimeout(_SEND_TIMEOUT)
            connection.sendto(datagram, socket_path)
    except OSError as error:
        raise AgentError(f"cannot answer through {socket_path}: "
                         f"{error.strerror or error}") from None
    finally:
        datagram[:] = bytes(len(datagram))
