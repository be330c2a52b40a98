"""Drive non-blocking :class:`~mandos_protocol.gnutls.Session` calls from an asyncio loop.

GnuTLS does the crypto in C (ctypes releases the GIL); this module only waits for the socket
readiness GnuTLS asks for, so a slow or silent peer costs a registered file descriptor and a
timer, never a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from mandos_protocol.gnutls import Session

T = TypeVar("T")


async def run(session: Session, fd: int, operation: Callable[[], T]) -> T:
    """Call ``operation`` (a method of ``session``) until it stops raising BlockingIOError.

    Deadlines are the caller's: wrap this in :func:`asyncio.timeout`.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            return operation()
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            if session.want_write:
                loop.add_writer(fd, ready.set_result, None)
                remove = loop.remove_writer
            else:
                loop.add_reader(fd, ready.set_result, None)
                remove = loop.remove_reader
            try:
                await ready
            finally:
                remove(fd)
