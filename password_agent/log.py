# SPDX-License-Identifier: GPL-3.0-or-later
"""The agent's log lines, as systemd expects them.

On stderr, one line per record.  When stderr is the journal's stream (``JOURNAL_STREAM`` names
its device and inode, as systemd sets it for ``StandardError=journal``), every line starts with
its syslog priority, ``<4>`` for a warning (sd-daemon(3)), so that journald stores it with that
``PRIORITY`` and ``journalctl -p warning`` shows the agent's warnings and errors alone.  On a
terminal the lines stay plain.  ``SYSTEMD_LOG_LEVEL`` (``debug``, ``info``, ``notice``,
``warning``, ``err``, …, or ``0``-``7``) sets how much is logged, as for systemd's own tools;
``--debug`` logs everything.  No journal library: the initramfs has none.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PREFIX = "mandos-password-agent: "
#: syslog(3)'s priorities by name, as systemd spells them in ``SYSTEMD_LOG_LEVEL``.
PRIORITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}


def priority(level: int) -> int:
    """The syslog priority of a ``logging`` level."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


#: The ``logging`` level that keeps the records of each syslog priority and above (notice
#: keeps warnings: the agent logs nothing between info and warning).
THRESHOLDS = (logging.CRITICAL, logging.CRITICAL, logging.CRITICAL, logging.ERROR,
              logging.WARNING, logging.WARNING, logging.INFO, logging.DEBUG)


def threshold(text: str | None) -> int | None:
    """The ``logging`` level for a ``SYSTEMD_LOG_LEVEL`` value; None if it is unset or not a
    priority (the default holds then)."""
    value = (text or "").strip().lower()
    number = int(value) if value.isdigit() else PRIORITIES.get(value)
    return None if number is None or number >= len(THRESHOLDS) else THRESHOLDS[number]


def journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of it; a child that inherited the variable but not the stream does not
    prefix)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


class _Formatter(logging.Formatter):
    """``PREFIX`` and the message; with ``<priority>`` in front for the journal."""

    def __init__(self, prefixed: bool) -> None:
        super().__init__(PREFIX + "%(message)s")
        self.prefixed = prefixed

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.prefixed:
            return text
        # A line of its own per line of the message: journald reads each line on its own.
        tag = f"<{priority(record.levelno)}>"
        return "\n".join(tag + line for line in text.splitlines())


def setup(debug: bool, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at the level ``--debug`` or ``SYSTEMD_LOG_LEVEL`` asks for,
    info by default."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(journal_stream(stream)))
    level = logging.DEBUG if debug else threshold(os.environ.get("SYSTEMD_LOG_LEVEL"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if level is None else level)
