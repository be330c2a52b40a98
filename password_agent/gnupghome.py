# SPDX-License-Identifier: GPL-3.0-or-later
"""A throw-away GnuPG home: made private (0700), its gpg-agent stopped and the directory removed
on exit, also on failure.

Both the agent (decrypting the blob) and ``mandos-keygen`` (making keys, encrypting the
password) run gpg this way, as upstream's client and keygen do, so that no key material and no
agent outlives the operation.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from password_agent.errors import AgentError

log = logging.getLogger(__name__)

_GPGCONF_TIMEOUT = 10.0
#: gpg-agent puts its sockets in the home; a socket address holds at most 107 bytes of path.
_SOCKET_PATH_MAX = 107
_LONGEST_SOCKET = "S.gpg-agent.browser"


def _fits(parent: Path | str, prefix: str) -> bool:
    longest = os.path.join(parent, prefix + "x" * 8, _LONGEST_SOCKET)
    return len(os.fsencode(longest)) <= _SOCKET_PATH_MAX


def make_home(prefix: str, preferred: Path | None = None) -> Path:
    """A fresh 0700 GNUPGHOME: in ``preferred`` (e.g. a directory under /run) if usable, else
    in the temporary directory, else in /tmp: wherever the agent's socket paths fit."""
    candidates: list[Path | str] = [tempfile.gettempdir(), "/tmp"]
    if preferred is not None:
        candidates.insert(0, preferred)
    for parent in candidates:
        if not _fits(parent, prefix):
            continue
        try:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as error:
            log.warning("cannot make a GnuPG home in %s (%s)", parent, error.strerror)
    raise AgentError("cannot make a private GnuPG home in any of "
                     + ", ".join(str(c) for c in candidates))


def remove_home(home: Path) -> None:
    """Stop the gpg-agent of ``home`` and remove it: no key material and no agent outlives
    the operation."""
    try:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=_GPGCONF_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("cannot stop gpg-agent for %s: %s", home, error)
    shutil.rmtree(home, ignore_errors=True)


def remove_stale_homes(parent: Path, prefix: str) -> None:
    """Remove every home named ``prefix*`` in ``parent``, left by an agent that was killed
    before it could (the caller knows that no live agent uses ``parent``)."""
    for home in parent.glob(f"{prefix}*"):
        if home.is_dir() and not home.is_symlink():
            log.warning("removing the GnuPG home %s, left by an agent that was killed", home)
            remove_home(home)


@contextmanager
def private_home(prefix: str, preferred: Path | None = None) -> Iterator[Path]:
    """:func:`make_home`, removed with :func:`remove_home` on exit, also on failure."""
    home = make_home(prefix, preferred)
    try:
        yield home
    finally:
        remove_home(home)
