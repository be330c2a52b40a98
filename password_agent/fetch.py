# SPDX-License-Identifier: GPL-3.0-or-later
"""Fetching the encrypted blob from one Mandos server, as upstream's ``mandos-client`` does.

TCP connect, then the exchange of :mod:`mandos_protocol.client` (the protocol line, TLS 1.3 in
the TLS *server* role presenting our raw public key, the blob until close_notify).  An empty
blob is a refusal.

The socket and the GnuTLS session are non-blocking, and every wait goes through the caller's
``wait`` (the :class:`~password_agent.watch.RequestWatcher`'s), which also keeps the requests
current and acts on SIGTERM.  So one deadline bounds the whole exchange with a server (connect,
handshake and body together): per-record timeouts let a server that sends a byte now and then
keep the agent busy for hours.  And the blob is capped (:data:`mandos_protocol.client.MAX_BLOB`).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from mandos_protocol.client import ClientExchange
from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority
from password_agent.errors import AgentError, NetworkNotUp
from password_agent.servers import Server

#: How long the whole exchange with one server may take: connect, handshake and blob.
FETCH_TIMEOUT = 10.0
#: What ``connect`` says while this host's network is still coming up: no route yet, or the
#: link-local source address still tentative.
NETWORK_NOT_UP = (errno.ENETUNREACH, errno.EADDRNOTAVAIL)

#: ``wait(fd, write, seconds)``: wait up to ``seconds`` for ``fd`` to be writable (else
#: readable); raises to abandon the fetch (SIGTERM, no request left).
Wait = Callable[[int, bool, float], None]

T = TypeVar("T")


class _Exchange:
    """One connection's non-blocking calls, each retried on readiness until the deadline."""

    def __init__(self, server: Server, wait: Wait, timeout: float) -> None:
        self.server = server
        self.wait = wait
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    def drive(self, operation: Callable[[], T], fd: int,
              want_write: Callable[[], bool]) -> T:
        while True:
            try:
                return operation()
            except BlockingIOError:
                pass
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{self.server} took longer than {self.timeout:g} s; "
                                 "giving up on it for this round")
            self.wait(fd, want_write(), left)


def _connected(connection: socket.socket) -> None:
    """Returns once the non-blocking connect has finished; raises its error, or
    BlockingIOError while it is still in progress."""
    code = connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))
    try:
        connection.getpeername()
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise BlockingIOError from None
        raise


def _connect(server: Server, exchange: _Exchange) -> socket.socket:
    """A connected non-blocking TCP socket to ``server`` (each of its addresses in turn)."""
    try:
        addresses = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise AgentError(f"cannot connect to {server}: {error.strerror or error}") from None
    failure: OSError | None = None
    for family, kind, protocol, _, address in addresses:
        connection = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   protocol)
        try:
            code = connection.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            exchange.drive(functools.partial(_connected, connection), connection.fileno(),
                           lambda: True)
            return connection
        except OSError as error:
            connection.close()
            failure = error
        except BaseException:
            connection.close()
            raise
    reason = (failure.strerror or str(failure)) if failure is not None else "no address"
    if failure is not None and failure.errno in NETWORK_NOT_UP:
        raise NetworkNotUp(f"cannot connect to {server}: {reason}")
    raise AgentError(f"cannot connect to {server}: {reason}")


def fetch_blob(server: Server, credentials: Credentials, priority: Priority, wait: Wait, *,
               timeout: float = FETCH_TIMEOUT) -> bytes:
    """The blob ``server`` sends us (``b""`` if it refused) within ``timeout`` seconds;
    :class:`AgentError` on failure.  ``wait`` may raise to abandon the fetch."""
    exchange = _Exchange(server, wait, timeout)
    connection = _connect(server, exchange)
    fd = connection.fileno()
    with connection:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ClientExchange(fd, connection.send, credentials, priority,
                                nonblocking=True) as client:
                exchange.drive(client.send_protocol_line, fd, lambda: True)
                exchange.drive(client.handshake, fd, lambda: client.want_write)
                blob = exchange.drive(client.receive_blob, fd, lambda: client.want_write)
                client.close_notify()
        except OSError as error:
            raise AgentError(f"talking to {server} failed: {error.strerror or error}") from None
        except ProtocolError as error:
            raise AgentError(f"talking to {server} failed: {error}") from None
    return blob
