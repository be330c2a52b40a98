# SPDX-License-Identifier: GPL-3.0-or-later
"""SIGTERM and SIGINT: the handler only records the signal; the agent acts on it where it
waits.

An exception raised from a signal handler lands wherever the main thread happens to be, and
any broad handler there swallows it: right after ``READY=1`` that is inside sdnotify's
``notify()``, whose bare ``except:`` did so in 23 of 30 resident agents stopped at that moment,
and systemd then waited ``TimeoutStopSec`` with the GnuPG home (the secret key) still in
``/run``.  So :func:`install`'s handler only sets a flag.  Python's signal wake-up fd, which
every wait of the agent polls (:class:`~password_agent.watch.RequestWatcher`, and through it
the fetch), ends the wait at once, and :func:`check`, called after each wait and between the
steps of a request, raises :class:`Terminated` from ordinary code, where the ``finally`` blocks
that stop gpg-agent and remove the home run as they should.  ``mandos-keygen`` uses it too,
for SIGTERM and SIGHUP, so that an interrupted run removes its temporary GnuPG home (the new
secret key) and stops its gpg-agent.
"""

from __future__ import annotations

import signal
from types import FrameType

_received: int | None = None


class Terminated(BaseException):
    """SIGTERM (or SIGINT) arrived: unwind, removing the GnuPG home on the way, and exit 0.
    A BaseException, so that no ``except Exception`` on the way stops it."""


def _record(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signum


def install(signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Record ``signals`` from now on (main thread only)."""
    global _received
    _received = None
    for signum in signals:
        signal.signal(signum, _record)


def received() -> int | None:
    """The stop signal recorded, if any."""
    return _received


def check() -> None:
    """Raise :class:`Terminated` if a stop was asked for."""
    if _received is not None:
        raise Terminated(signal.Signals(_received).name)
