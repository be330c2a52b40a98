"""The agent's private directory under ``/run``: where the record of answers sent and the
temporary GnuPG homes live.  Root only (0700), a real directory (not a symlink), owned by us."""

from __future__ import annotations

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
