# SPDX-License-Identifier: GPL-3.0-or-later
"""Drive non-blocking :class:`~mandos_protocol.gnutls.Session` calls from an asyncio loop.

GnuTLS does the crypto in C (ctypes releases the GIL); this module only waits for the socket
readiness GnuTLS asks for, so a slow or silent peer costs a registered file descriptor and a
timer, never a thread.

:class:`Driver` drives one connection: it retries the call inside the loop's readiness
callback, so the waiting task wakes once per call instead of once per wait, the file descriptor
stays registered across calls (not added and removed around every wait, two ``epoll_ctl``
each), and a deadline is a timer armed only when a call has to wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from mandos_protocol.gnutls import Session

T = TypeVar("T")


class Driver:
    """Non-blocking calls on one socket, each retried from the loop until it is done.

    ``session`` (settable later, e.g. after a plain-text phase) tells which readiness a
    blocked call waits for; without one, calls wait to read.  The descriptor stays registered
    until :meth:`close`, except that a readiness with no call pending unregisters it, so that
    an idle socket with unread data never spins the loop.  Call :meth:`close` before closing
    the socket.
    """

    def __init__(self, fd: int, session: Session | None = None) -> None:
        self.fd = fd
        self.session = session
        self._loop = asyncio.get_running_loop()
        self._watching: bool | None = None  # None: unregistered; else whether for writing
        self._operation: Callable[[], Any] | None = None
        self._future: asyncio.Future[Any] | None = None

    async def run(self, operation: Callable[[], T], timeout: float | None = None) -> T:
        """The result of ``operation``, called again on each readiness while it raises
        BlockingIOError; TimeoutError if that takes more than ``timeout`` seconds."""
        try:
            return operation()
        except BlockingIOError:
            pass
        future: asyncio.Future[T] = self._loop.create_future()
        timer = None if timeout is None else self._loop.call_later(
            timeout, _expire, future)
        self._operation, self._future = operation, future
        self._watch()
        try:
            return await future
        finally:
            self._operation = self._future = None
            if timer is not None:
                timer.cancel()

    def _watch(self) -> None:
        want_write = self.session is not None and self.session.want_write
        if self._watching is want_write:
            return
        self._unwatch()
        if want_write:
            self._loop.add_writer(self.fd, self._ready)
        else:
            self._loop.add_reader(self.fd, self._ready)
        self._watching = want_write

    def _unwatch(self) -> None:
        if self._watching is None:
            return
        if self._watching:
            self._loop.remove_writer(self.fd)
        else:
            self._loop.remove_reader(self.fd)
        self._watching = None

    def _ready(self) -> None:
        future, operation = self._future, self._operation
        if future is None or operation is None or future.done():
            self._unwatch()
            return
        try:
            result = operation()
        except BlockingIOError:
            self._watch()
            return
        except Exception as error:  # the caller's to handle, as if it had called it itself
            future.set_exception(error)
        else:
            future.set_result(result)
        self._operation = None

    def close(self) -> None:
        """Unregister the descriptor (any call still pending is the caller's to cancel)."""
        self._unwatch()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
