# SPDX-License-Identifier: GPL-3.0-or-later
"""Notice changes in clients.d/, so that a file dropped there, rewritten or removed takes effect
without a SIGHUP.

inotify (``inotify_simple``) watches the configuration directory, for clients.d itself
appearing or going, and clients.d, for its files; the event loop reads the descriptor
(``add_reader``).  A burst of events is one call of ``on_change``: ``DEBOUNCE`` seconds after
the last event that matters, but at most ``MAX_DELAY`` after the first, so that files
rewritten without a pause still get read.  An editor's save (a temporary file written, the old
one renamed to a backup, the new one renamed into place) is one such burst.  Only names that
the loader reads matter (:func:`server.config.is_client_file_name`);
an event queue overflow counts too.  clients.conf is not watched: it is reloaded on SIGHUP
only, as it always was.

What inotify cannot see (a file changed through a symbolic link that points out of clients.d,
a change of mode) takes a SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from server.config import CLIENTS_D, is_client_file_name

#: Seconds of quiet after the last relevant event before reloading.
DEBOUNCE = 0.2
#: Seconds from the first relevant event of a burst to the reload, at the latest.
MAX_DELAY = 1.0

_FILES = (inotify_flags.CREATE | inotify_flags.CLOSE_WRITE | inotify_flags.MOVED_TO
          | inotify_flags.MOVED_FROM | inotify_flags.DELETE | inotify_flags.DELETE_SELF
          | inotify_flags.MOVE_SELF | inotify_flags.ONLYDIR)
_PARENT = (inotify_flags.CREATE | inotify_flags.MOVED_TO | inotify_flags.MOVED_FROM
           | inotify_flags.DELETE | inotify_flags.ONLYDIR)


class ClientsDirWatch:
    """Calls ``on_change`` on the event loop after files in ``configdir``/clients.d change;
    ``warn`` gets a sentence when inotify cannot be used (SIGHUP still reloads)."""

    def __init__(self, configdir: Path, on_change: Callable[[], None],
                 warn: Callable[[str], None]) -> None:
        self.configdir = configdir
        self.directory = configdir / CLIENTS_D
        self.on_change = on_change
        self.warn = warn
        self._inotify: INotify | None = None
        self._parent_wd: int | None = None
        self._directory_wd: int | None = None
        self._first: float | None = None  # loop time of the burst's first event
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Watch from now on (call on the running loop)."""
        try:
            self._inotify = INotify()
            self._parent_wd = self._inotify.add_watch(self.configdir, _PARENT)
        except OSError as error:
            self.close()
            self.warn(f"Cannot watch {self.configdir} for changes in {CLIENTS_D}/ "
                      f"({error.strerror}); reload with SIGHUP after changing files there")
            return
        self._watch_directory()
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._readable)

    def _watch_directory(self) -> None:
        assert self._inotify is not None
        try:
            self._directory_wd = self._inotify.add_watch(self.directory, _FILES)
        except FileNotFoundError:
            self._directory_wd = None  # not there (yet): the parent's watch sees it come
        except OSError as error:
            self._directory_wd = None
            self.warn(f"Cannot watch {self.directory} ({error.strerror}); reload with SIGHUP "
                      "after changing files there")

    def _readable(self) -> None:
        assert self._inotify is not None
        relevant = False
        for event in self._inotify.read(timeout=0):
            relevant |= self._handle(event.wd, event.mask, event.name)
        if relevant:
            self._schedule()

    def _handle(self, wd: int, mask: int, name: str) -> bool:
        """Follow clients.d coming and going; whether the event may change what is read."""
        assert self._inotify is not None
        if mask & inotify_flags.Q_OVERFLOW:
            return True
        if wd == self._parent_wd:
            if name != CLIENTS_D:
                return False
            if mask & (inotify_flags.CREATE | inotify_flags.MOVED_TO):
                self._forget_directory()
                self._watch_directory()
            elif mask & inotify_flags.MOVED_FROM:
                self._forget_directory()  # the watch would follow it to its new name
            return True
        if wd != self._directory_wd:
            return False  # a watch already replaced
        if mask & inotify_flags.IGNORED:
            self._directory_wd = None
            return True
        if mask & (inotify_flags.DELETE_SELF | inotify_flags.MOVE_SELF):
            self._forget_directory()
            return True
        return is_client_file_name(name)

    def _forget_directory(self) -> None:
        if self._inotify is not None and self._directory_wd is not None:
            with contextlib.suppress(OSError):  # already gone with the directory
                self._inotify.rm_watch(self._directory_wd)
        self._directory_wd = None

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._first is None:
            self._first = now
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(min(now + DEBOUNCE, self._first + MAX_DELAY), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._first = None
        self.on_change()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inotify is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
