# SPDX-License-Identifier: GPL-3.0-or-later
"""The kernel command line, read as upstream's initramfs-tools script reads it.

``mandos=`` takes comma-separated words: ``off`` (do nothing at all), ``connect`` (bring the
network up and browse with Zeroconf; a configured ``--connect`` still applies) and
``connect:ADDRESS:PORT`` (ask that server; the last one given wins, and it overrides the
configuration).  ``ip=…`` with at least six fields names the network device in its sixth field,
which becomes the ``--interface``.  Unknown words are logged and skipped.
(Upstream's script: /usr/share/initramfs-tools/scripts/init-premount/mandos.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CMDLINE = Path("/proc/cmdline")


@dataclass(frozen=True)
class KernelOptions:
    """What the kernel command line asks of the agent."""

    off: bool = False
    connect: str | None = None  # ADDRESS:PORT from mandos=connect:ADDRESS:PORT
    interface: str | None = None  # the device of ip=…:…:…:…:…:DEVICE


def parse_cmdline(text: str) -> KernelOptions:
    """The ``mandos=`` and ``ip=`` parameters of a kernel command line."""
    off = False
    connect: str | None = None
    interface: str | None = None
    for parameter in text.split():
        if parameter.startswith("ip="):
            fields = parameter[len("ip="):].split(":")
            if len(fields) >= 6:
                interface = fields[5] or None
        elif parameter.startswith("mandos="):
            for word in parameter[len("mandos="):].split(","):
                if word == "off":
                    off = True
                elif word == "connect":
                    pass  # network plus Zeroconf: what the agent does without --connect
                elif word.startswith("connect:"):
                    connect = word[len("connect:"):]
                elif word:
                    log.warning("ignoring unknown kernel command line option mandos=%s", word)
    return KernelOptions(off=off, connect=connect, interface=interface)


def read_cmdline(path: Path = DEFAULT_CMDLINE) -> KernelOptions:
    """:func:`parse_cmdline` of ``path``; no options if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        log.warning("cannot read %s (%s); ignoring the kernel command line", path,
                    error.strerror)
        return KernelOptions()
    return parse_cmdline(text)
