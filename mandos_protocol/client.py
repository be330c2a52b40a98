# SPDX-License-Identifier: GPL-3.0-or-later
"""The Mandos client's side of one exchange on a connected socket, written once for the agent,
the tests' client and the benchmark's load generator.

The client sends the protocol line ``1\\r\\n``, then runs TLS 1.3 in the TLS *server* role
presenting its raw public key; the server sends the blob and close_notify (an empty blob is a
refusal); the client answers with its own close_notify without waiting for anything more.

:class:`ClientExchange` gives the steps one by one.  On a non-blocking socket each step either
finishes or raises :class:`BlockingIOError`; the caller waits until the socket is ready (for
writing if :attr:`ClientExchange.want_write`, else for reading) and calls the step again, as
often as its own deadline allows.  That is how the agent runs it, every wait going through its
request watcher.  :func:`exchange_blob` runs the steps on a blocking socket.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from types import TracebackType

from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority, Session
from mandos_protocol.wire import PROTOCOL_LINE, resumable_send

#: An OpenPGP-encrypted password is well under 2 KiB; anything this large is not one.
MAX_BLOB = 64 * 1024


class ClientExchange:
    """One exchange's steps, in order: :meth:`send_protocol_line`, :meth:`handshake`,
    :meth:`receive_blob` (which returns the blob), :meth:`close_notify`.  ``send`` is the
    socket's ``send``; ``timeout`` bounds each TLS record's wait on a blocking socket (None:
    as long as the socket's own timeouts allow)."""

    def __init__(self, fd: int, send: Callable[[memoryview], int], credentials: Credentials,
                 priority: Priority, *, nonblocking: bool = False,
                 timeout: float | None = None, max_blob: int = MAX_BLOB) -> None:
        self.session = Session.for_mandos_client(fd, credentials, priority,
                                                 nonblocking=nonblocking, timeout=timeout)
        self.send_protocol_line = resumable_send(send, PROTOCOL_LINE)
        self._max_blob = max_blob
        self._chunks: list[bytes] = []
        self._received = 0

    def __enter__(self) -> ClientExchange:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.session.close()

    @property
    def want_write(self) -> bool:
        """Whether the TLS step that raised BlockingIOError waits to write (else to read);
        :meth:`send_protocol_line` always waits to write."""
        return self.session.want_write

    def handshake(self) -> None:
        self.session.handshake()

    def receive_blob(self) -> bytes:
        """The blob, once the server's close_notify has come; past ``max_blob`` bytes a
        :class:`ProtocolError` at once instead of reading on."""
        while chunk := self.session.recv():
            self._received += len(chunk)
            if self._received > self._max_blob:
                raise ProtocolError(f"the server sent more than {self._max_blob} bytes; a real"
                                    " blob is under 2 KiB")
            self._chunks.append(chunk)
        return b"".join(self._chunks)

    def close_notify(self) -> None:
        """Our close_notify; the blob is complete, so a server already gone is no error."""
        with contextlib.suppress(ProtocolError, BlockingIOError):
            self.session.bye(wait_for_peer=False)


def exchange_blob(sock: socket.socket, credentials: Credentials, priority: Priority, *,
                  timeout: float | None = None, max_blob: int = MAX_BLOB) -> bytes:
    """The whole exchange on a connected blocking socket: the blob the server sent (``b""``
    for a refusal); :class:`ProtocolError` or :class:`OSError` on failure."""
    with ClientExchange(sock.fileno(), sock.send, credentials, priority, timeout=timeout,
                        max_blob=max_blob) as exchange:
        exchange.send_protocol_line()
        exchange.handshake()
        blob = exchange.receive_blob()
        exchange.close_notify()
    return blob
