# SPDX-License-Identifier: GPL-3.0-or-later
"""Whether this server is healthy, for ``/healthz``: a list of checks, each saying why not.

A check is a function returning ``None`` when all is well, or a short reason an operator can
act on ("state directory /var/lib/mandos is read-only").  The daemon registers its own
(serving; the state can be saved); the fleet sync adds one for etcd (in sync) with
:meth:`Health.add`.  Checks run on the event loop at each request, so each must be cheap and
must not block: a flag, a counter, one ``access(2)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Check = Callable[[], str | None]


@dataclass(frozen=True)
class Verdict:
    """The answer of :meth:`Health.verdict`: healthy or not, and the first reason why not."""

    healthy: bool
    reason: str


class Health:
    """The checks, run in the order they were added."""

    def __init__(self) -> None:
        self._checks: list[Check] = []

    def add(self, check: Check) -> Callable[[], None]:
        """Run ``check`` at every verdict from now on; returns the function that removes it."""
        self._checks.append(check)
        return lambda: self._checks.remove(check)

    def verdict(self) -> Verdict:
        for check in list(self._checks):
            reason = check()
            if reason is not None:
                return Verdict(False, " ".join(reason.split()))  # one line
        return Verdict(True, "ok")


def directory_writable(directory: Path) -> str | None:
    """A check: ``directory`` can take a new file.  ``access(2)`` answers ``EROFS`` for a
    read-only mount even to root, whom file modes do not stop."""
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    return f"state directory {directory} is not writable"
