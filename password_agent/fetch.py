"""Fetching the encrypted blob from one Mandos server, as upstream's ``mandos-client`` does.

TCP connect, the protocol line ``1\\r\\n``, then TLS 1.3 in the TLS *server* role presenting our
raw public key; the server sends the blob and close_notify.  An empty blob is a refusal.
Everything is blocking with deadlines: the agent does nothing else meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority, Session
from mandos_protocol.wire import PROTOCOL_LINE
from password_agent.errors import AgentError
from password_agent.servers import Server

#: An OpenPGP-encrypted password is a few KiB; anything this large is not one.
MAX_BLOB = 1024 * 1024

CONNECT_TIMEOUT = 5.0
TLS_TIMEOUT = 10.0


def fetch_blob(server: Server, credentials: Credentials, priority: Priority, *,
               connect_timeout: float = CONNECT_TIMEOUT, tls_timeout: float = TLS_TIMEOUT
               ) -> bytes:
    """The blob ``server`` sends us (``b""`` if it refused); :class:`AgentError` on failure."""
    try:
        connection = socket.create_connection((server.host, server.port),
                                              timeout=max(0.1, connect_timeout))
    except OSError as error:
        raise AgentError(f"cannot connect to {server}: {error.strerror or error}") from None
    with connection:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # GnuTLS works on the descriptor: blocking, with kernel timeouts as a backstop.
            connection.settimeout(None)
            limit = struct.pack("ll", int(tls_timeout), int(tls_timeout % 1 * 1e6))
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            connection.sendall(PROTOCOL_LINE)
            with Session.for_mandos_client(connection.fileno(), credentials, priority,
                                           timeout=tls_timeout) as session:
                session.handshake()
                blob = session.recv_all(MAX_BLOB)
                with contextlib.suppress(ProtocolError):
                    # The blob is complete; the server may have gone already.
                    session.bye(wait_for_peer=False)
        except OSError as error:
            raise AgentError(f"talking to {server} failed: {error.strerror or error}") from None
        except ProtocolError as error:
            raise AgentError(f"talking to {server} failed: {error}") from None
    return blob
