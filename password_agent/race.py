# SPDX-License-Identifier: GPL-3.0-or-later
"""Asking several Mandos servers at once, staggered in order of preference (as happy eyeballs,
RFC 8305, does for addresses).

The first server gets a head start of :data:`STAGGER` seconds, then the second starts, and so
on; a server that fails lets the next one start at once.  Results come back as they arrive and
the caller takes the first blob that decrypts; leaving the loop abandons the attempts still
under way.  So a black-holed first server (its packets dropped: only the fetch's deadline would
end it) costs :data:`STAGGER`, not the whole deadline, while a healthy first server is the only
one asked.  Servers found by Zeroconf join the race as they are resolved (a :data:`Discover`
runs in a thread of its own), so the first is asked while the browse goes on for others.

Each attempt runs :func:`~password_agent.fetch.fetch_blob` in a thread of its own (its GnuTLS
calls go through ctypes, which releases the GIL).  Only the calling thread watches the
requests and acts on signals (the request watcher is not thread-safe), so an attempt waits on
its socket and on a cancel pipe, and the calling thread waits, through the ``wait`` it is
given, on a pipe the attempts write to when they finish.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass

from password_agent.errors import AgentError
from password_agent.fetch import Wait
from password_agent.servers import Server

#: The head start of each server over the next one in order of preference.
STAGGER = 0.25

#: ``fetch(server, wait)``: the blob ``server`` sends, waiting only through ``wait``.
Fetch = Callable[[Server, Wait], bytes]
#: ``discover(stopped, stop_fd)``: servers as they are found, in order of preference; it ends
#: when no more will come, or soon after ``stopped()`` turns true (``stop_fd`` turns readable
#: then, for its waits).
Discover = Callable[[Callable[[], bool], int], Iterable[Server]]


@dataclass(frozen=True)
class Outcome:
    """What one server gave: its blob (``b""`` is a refusal), or the error that ended it."""

    server: Server
    blob: bytes = b""
    error: AgentError | None = None


class _Cancelled(Exception):
    """The race is over: an attempt stops where it waits."""


def race(servers: Sequence[Server] | Discover, fetch: Fetch,
         wait: Callable[[int, float], None], keep_going: Callable[[], bool], *,
         stagger: float = STAGGER) -> Generator[Outcome, None, None]:
    """Each server's :class:`Outcome` as it arrives, the attempts started ``stagger`` seconds
    apart in the order of ``servers``: a list, or a :data:`Discover` run in a thread of its
    own, whose servers join the race as they are found.  ``wait(fd, seconds)`` is how the
    calling thread waits for ``fd`` to be readable (it may raise, e.g. on SIGTERM); the race
    ends when ``keep_going()`` turns false, or when every server known has answered and no
    more can come.  Closing the iterator cancels what is still running and joins its
    threads."""
    cancel_read, cancel_write = os.pipe2(os.O_CLOEXEC)
    done_read, done_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    found: queue.SimpleQueue[Server] = queue.SimpleQueue()
    cancelled = threading.Event()
    discovered = threading.Event()  # no more servers will come

    def attempt_wait(fd: int, write: bool, seconds: float) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        poller.register(cancel_read, select.POLLIN)
        if any(ready == cancel_read for ready, _ in poller.poll(seconds * 1000)):
            raise _Cancelled

    def attempt(server: Server) -> None:
        try:
            outcomes.put(Outcome(server, blob=fetch(server, attempt_wait)))
        except AgentError as error:
            outcomes.put(Outcome(server, error=error))
        except _Cancelled:
            pass
        finally:
            os.write(done_write, b"\0")

    def discover(servers: Discover) -> None:
        try:
            for server in servers(cancelled.is_set, cancel_read):
                found.put(server)
                os.write(done_write, b"\0")
                if cancelled.is_set():
                    break
        finally:
            discovered.set()
            os.write(done_write, b"\0")

    known: list[Server] = []
    threads: list[threading.Thread] = []
    if isinstance(servers, Sequence):
        known += servers
        discovered.set()
    else:
        threads.append(threading.Thread(target=discover, args=(servers,), daemon=True,
                                        name="discover servers"))
        threads[0].start()
    started = 0  # attempts started
    taken = 0  # outcomes handed out; every attempt that is not cancelled gives one
    try:
        next_start = time.monotonic()
        while keep_going():
            more = not discovered.is_set()  # read before the queue: nothing is missed
            with contextlib.suppress(queue.Empty):
                while True:
                    known.append(found.get_nowait())
            if not more and taken == len(known):
                break
            now = time.monotonic()
            waiting = started < len(known)
            if waiting and (now >= next_start or taken == started):
                server = known[started]
                thread = threading.Thread(target=attempt, args=(server,), daemon=True,
                                          name=f"fetch from {server}")
                threads.append(thread)
                thread.start()
                started += 1
                next_start = now + stagger
                continue
            wait(done_read, next_start - now if waiting else 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(done_read, 4096)
            while keep_going():
                try:
                    outcome = outcomes.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                yield outcome
    finally:
        cancelled.set()
        os.write(cancel_write, b"\0")
        for thread in threads:
            thread.join()
        for fd in (cancel_read, cancel_write, done_read, done_write):
            os.close(fd)
