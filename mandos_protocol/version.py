# SPDX-License-Identifier: GPL-3.0-or-later
"""The version every command reports (``--version``), and the upstream release it follows.

One number for the whole project: setup.cfg reads it from here (``attr:``), so the Python
distribution, ``mandos-server``, ``mandos-password-agent``, ``mandos-keygen`` and
``mandos-ctl`` cannot disagree.  It is ours, not upstream's: no upstream program reads another
one's version (the D-Bus API has no version property, and upstream's ``mandos-ctl`` and
``mandos-monitor`` do not ask), so reporting upstream's 1.8.16 as our own would only hide which
implementation runs.  The upstream release whose protocol, files, options and D-Bus API we
follow is said beside it.
"""

#: This implementation's version.
VERSION = "0.1.0"

#: The upstream Mandos release we are compatible with.
UPSTREAM_VERSION = "1.8.16"


def version_line(program: str) -> str:
    """What ``program --version`` prints: ``mandos-server 0.1.0 (Mandos 1.8.16 compatible)``."""
    return f"{program} {VERSION} (Mandos {UPSTREAM_VERSION} compatible)"
