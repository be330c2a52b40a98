# SPDX-License-Identifier: GPL-3.0-or-later
"""No core dumps from processes that hold secrets.

The agent holds the decrypted disk password and the client's private keys, keygen holds new
private keys, and the server holds every client's secret blob.  A crash (or a SIGSEGV/SIGABRT
sent on purpose) would otherwise write all of that into a core file wherever
``kernel.core_pattern`` points: the working directory, or systemd-coredump's store, which
keeps cores for days.  gpg and gpg-agent already refuse to dump core for the same reason.

Two settings, because each covers what the other misses: ``RLIMIT_CORE`` 0 (soft and hard) is
inherited by every child (checkers, gpg), but a core_pattern that pipes to a program ignores
it; ``PR_SET_DUMPABLE`` 0 stops every dump of this process, pipes included, and also keeps
other processes of the same user from ptrace-attaching to read its memory, but is reset by
``execve``.
"""

from __future__ import annotations

import ctypes
import resource

#: From <linux/prctl.h>.
PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Make this process (and, through the limit, its children) never dump core.  Best effort:
    a sandbox that forbids prctl leaves the limit, which is the part that matters there."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
