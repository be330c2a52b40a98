# SPDX-License-Identifier: GPL-3.0-or-later
"""The agent's private directory under ``/run``: where the record of answers sent and the
temporary GnuPG homes live.  Root only (0700), a real directory (not a symlink), owned by us.

Every agent using the directory holds a shared ``flock`` on it for as long as it runs, so that
an agent that finds no other holder knows that whatever GnuPG home is left in it is stale: an
agent killed with SIGKILL (systemd's last resort when a stop times out, e.g. at switch-root)
cannot remove its own, and /run is carried over from the initramfs to the booted system.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from password_agent.errors import AgentError

#: Default place; a tmpfs that the initramfs hands over to the booted system.
DEFAULT_RUN_DIRECTORY = Path("/run/mandos-password-agent")


def private_directory(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing and check that only we can use it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = os.lstat(path)
    except OSError as error:
        raise AgentError(f"cannot create the private directory {path}: {error.strerror}"
                         ) from None
    if not stat.S_ISDIR(status.st_mode):
        raise AgentError(f"{path} is not a directory; remove it, or pass --run-directory")
    if status.st_uid != os.geteuid():
        raise AgentError(f"{path} belongs to uid {status.st_uid}, not to us; remove it, or "
                         "pass --run-directory")
    if stat.S_IMODE(status.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def hold(path: Path) -> bool:
    """Hold ``path`` (shared) until the process exits; whether no other agent holds it, so
    that what earlier agents left in it is stale."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(descriptor, fcntl.LOCK_SH)  # the descriptor stays open: held until exit
    return alone
