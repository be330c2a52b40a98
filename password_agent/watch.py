# SPDX-License-Identifier: GPL-3.0-or-later
"""Watching the agent directory: which requests are pending, which are present but not ours.

systemd's requester creates ``ask.*`` atomically by rename (IN_MOVED_TO; its IN_CLOSE_WRITE only
comes after it deleted the file), other writers may write in place (IN_CLOSE_WRITE), and a
request goes away by IN_DELETE or IN_MOVED_FROM.  Files already there are read at start.

A request is *pending* while the agent means to answer it.  Requests it will not answer, or has
answered, stay *present* until their file goes away; the agent keeps running while any are
present, because its ``.path`` unit (``PathExistsGlob=…/ask.*``) would otherwise start it again
at once, in a loop, for as long as the file exists.  With ``--watch`` it never exits on its own:
it sleeps in the inotify read until a request is pending.

Every sleep is a ``poll`` on the inotify descriptor *and* on a pipe that Python's signal
wake-up (``signal.set_wakeup_fd``) writes to.  Without the pipe, a SIGTERM that lands just before
the ``poll`` system call (or on another thread) is handled only when the ``poll`` times out, up
to a minute later: at switch-root, systemd would wait that long for the agent to stop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import time
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from password_agent import stopsignal
from password_agent.asks import AskRequest, Ignored, load_request
from password_agent.errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_AGENT_DIRECTORY = Path("/run/systemd/ask-password")

_MASK = (inotify_flags.MOVED_TO | inotify_flags.CLOSE_WRITE | inotify_flags.DELETE
         | inotify_flags.MOVED_FROM | inotify_flags.DELETE_SELF)

#: A requester can die without removing its file; look at pending requests at least this often.
_RECHECK_SECONDS = 1.0
#: With nothing pending, only inotify matters; wake now and then regardless.
_IDLE_WAKE_SECONDS = 60.0


class RequestWatcher:
    """The pending and present requests of one agent directory, kept current by inotify."""

    def __init__(self, directory: Path, *, all_requests: bool = False,
                 create: bool = False) -> None:
        """``create``: make ``directory`` (0755) if it is missing, as the ``.path`` unit's
        ``MakeDirectory=yes`` does; a resident agent may start before anyone made it."""
        self.directory = directory
        self.all_requests = all_requests
        self.pending: dict[Path, AskRequest] = {}
        #: Requests present but not to be answered (again), with the reason.
        self.present: dict[Path, str] = {}
        self._inotify = INotify()
        try:
            if create:
                directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._inotify.add_watch(directory, _MASK)
        except OSError as error:
            self._inotify.close()
            raise AgentError(f"cannot watch the agent directory {directory}: "
                             f"{error.strerror}; is --agent-directory right?") from None
        self._gone = False
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_write)
        self._poller = select.poll()
        self._poller.register(self._inotify.fileno(), select.POLLIN)
        self._poller.register(self._wakeup_read, select.POLLIN)
        self.scan()

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)
        self._inotify.close()

    def __enter__(self) -> RequestWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing present: time to exit."""
        return not self.pending and not self.present

    def scan(self) -> None:
        """(Re)read every ``ask.*`` file, and forget those that are gone."""
        try:
            names = sorted(path.name for path in self.directory.iterdir())
        except OSError as error:
            if error.errno == errno.ENOENT:
                self._directory_gone()
                return
            raise AgentError(f"cannot list the agent directory {self.directory}: "
                             f"{error.strerror}") from None
        for path in [*self.pending, *self.present]:
            if path.name not in names:
                self._forget(path)
        for name in names:
            if name.startswith("ask."):
                path = self.directory / name
                if path not in self.pending and path not in self.present:
                    self._consider(path)

    def _consider(self, path: Path) -> None:
        result = load_request(path, self.directory, all_requests=self.all_requests)
        if isinstance(result, Ignored):
            if not path.exists():
                self._forget(path)  # gone already: no news
                return
            self.pending.pop(path, None)
            if self.present.get(path) != result.reason:
                log.info("ignoring %s: %s", path.name, result.reason)
            self.present[path] = result.reason
            return
        self.present.pop(path, None)
        if path not in self.pending:
            left = result.seconds_left()
            log.info("request %s (Id %s, PID %d%s) pending", path.name, result.id, result.pid,
                     "" if left is None else f", {left:.0f} s left")
        self.pending[path] = result

    def _forget(self, path: Path) -> None:
        if self.pending.pop(path, None) is not None:
            log.info("request %s went away", path.name)
        self.present.pop(path, None)

    def _directory_gone(self) -> None:
        if not self._gone:
            log.warning("the agent directory %s went away", self.directory)
        self._gone = True
        for path in [*self.pending, *self.present]:
            self._forget(path)

    def set_aside(self, path: Path, reason: str) -> None:
        """Stop answering a pending request (answered, or not to be answered again)."""
        if self.pending.pop(path, None) is not None:
            self.present[path] = reason

    def expire(self) -> None:
        """Set aside pending requests whose NotAfter passed or whose requester died."""
        for path, request in list(self.pending.items()):
            reason = request.stale_reason()
            if reason is not None:
                log.info("dropping %s: %s", path.name, reason)
                self.set_aside(path, reason)

    def poll(self, timeout: float = 0.0) -> None:
        """Handle what happened, waiting up to ``timeout`` seconds for the first event."""
        self._sleep(timeout)
        events = self._inotify.read(timeout=0)
        if self._gone:
            return
        rescan = False
        for event in events:
            if event.mask & (inotify_flags.Q_OVERFLOW | inotify_flags.DELETE_SELF
                             | inotify_flags.IGNORED):
                rescan = True
                continue
            if not event.name.startswith("ask."):
                continue
            path = self.directory / event.name
            if event.mask & (inotify_flags.DELETE | inotify_flags.MOVED_FROM):
                self._forget(path)
            elif event.mask & inotify_flags.MOVED_TO or (
                    event.mask & inotify_flags.CLOSE_WRITE
                    and path not in self.pending and path not in self.present):
                self._consider(path)
        if rescan:
            self.scan()
        self.expire()

    def _sleep(self, timeout: float, fd: int | None = None, events: int = 0) -> None:
        """Wait up to ``timeout`` seconds for an inotify event, a signal, or (if given) the
        ``events`` on ``fd``.  A stop signal (SIGTERM) recorded before or during the wait
        raises :class:`~password_agent.stopsignal.Terminated`."""
        stopsignal.check()
        if fd is not None:
            self._poller.register(fd, events)
        try:
            ready = self._poller.poll(max(0, int(timeout * 1000)))
        finally:
            if fd is not None:
                self._poller.unregister(fd)
        if any(ready_fd == self._wakeup_read for ready_fd, _ in ready):
            try:
                while os.read(self._wakeup_read, 512):
                    pass
            except BlockingIOError:
                pass
        stopsignal.check()

    def wait_for_socket(self, fd: int, *, write: bool, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for ``fd`` to be readable (or writable), keeping
        the requests current meanwhile.  The fetch waits so: a request that goes away, or
        SIGTERM, ends its wait at once."""
        self._sleep(min(timeout, _RECHECK_SECONDS), fd,
                    select.POLLOUT if write else select.POLLIN)
        self.poll()

    def _next_wake(self, until: float) -> float:
        """Seconds to sleep before something needs a look: ``until`` (a monotonic time), a
        pending request's NotAfter, or the periodic requester check."""
        wake = until - time.monotonic()
        for request in self.pending.values():
            left = request.seconds_left()
            if left is not None:
                wake = min(wake, left + 0.001)
        if self.pending:
            wake = min(wake, _RECHECK_SECONDS)
        return max(0.0, wake)

    def wait_while_pending(self, seconds: float, wake: int | None = None) -> None:
        """Sleep ``seconds``, keeping the requests current; return early once none is
        pending, or once the file descriptor ``wake`` (a Zeroconf browse's) is readable."""
        until = time.monotonic() + seconds
        self.poll()
        while self.pending and time.monotonic() < until:
            if wake is None:
                self.poll(self._next_wake(until))
                continue
            self.wait_for_socket(wake, write=False, timeout=self._next_wake(until))
            if select.select([wake], [], [], 0)[0]:
                return

    def wait_for_request(self) -> None:
        """With nothing pending (``--watch``), sleep until something is."""
        while not self.pending:
            if self._gone:
                raise AgentError(f"the agent directory {self.directory} went away; nothing "
                                 "can be asked there any more")
            self.poll(_IDLE_WAKE_SECONDS)

    def wait_until_idle(self, until: float | None) -> None:
        """With nothing pending, keep watching until nothing is present either, something new
        is pending, or the monotonic time ``until``."""
        while not self.pending and self.present:
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                return
            self.poll(_IDLE_WAKE_SECONDS if left is None else min(left, _IDLE_WAKE_SECONDS))
