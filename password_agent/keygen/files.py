# SPDX-License-Identifier: GPL-3.0-or-later
"""The key directory: which files it holds, refusing to overwrite them, numbered backups.

Upstream refuses to touch a directory that already holds any of the four key files unless
``--force``; with it, each old file is kept as ``NAME.~N~`` (``cp --backup=numbered``).  We
write every new file beside its final name first and rename it into place, so a failure
never leaves a half-written key, and only after all keys were made; a failure while writing
(a full disk) leaves the old files as they were and no new one.  Temporary files that a
killed keygen left (they may hold a secret key) are removed first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mandos_protocol import durable
from password_agent.errors import AgentError
from password_agent.keyfiles import KeyFiles

#: Where upstream's keygen looks, in this order, when ``--dir`` is not given.
DEFAULT_DIRECTORIES = (Path("/etc/keys/mandos"), Path("/etc/mandos/keys"))

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def check_directory(directory: Path, *, writable: bool) -> None:
    """Upstream's checks, with its messages, before any key is made."""
    if not directory.is_dir():
        raise AgentError(f"{directory} not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise AgentError(f"Directory {directory} not readable")
    if writable and not os.access(directory, os.W_OK):
        raise AgentError(f"Directory {directory} not writeable")


def refuse_overwrite(files: KeyFiles, force: bool) -> None:
    """Upstream's refusal when any key file exists and ``--force`` was not given."""
    if not force and any(os.path.lexists(path) for path in files.all()):
        raise AgentError("Refusing to overwrite old key files; use --force")


def default_directory() -> Path:
    """``/etc/keys/mandos``, or ``/etc/mandos/keys`` when only that one exists (as upstream)."""
    preferred, fallback = DEFAULT_DIRECTORIES
    return preferred if preferred.is_dir() or not fallback.is_dir() else fallback


def backup_name(path: Path) -> Path:
    """The next ``NAME.~N~`` beside ``path``, numbered as ``cp --backup=numbered`` does."""
    pattern = re.compile(re.escape(path.name) + r"\.~([1-9][0-9]*)~")
    numbers = [int(match.group(1)) for entry in os.listdir(path.parent)
               if (match := pattern.fullmatch(entry))]
    return path.with_name(f"{path.name}.~{max(numbers, default=0) + 1}~")


def install(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write each ``path: (contents, mode)``; an existing file is first renamed to a backup.

    Each file is written and synced under a temporary name in the same directory (created with
    its final mode, so a secret is never readable by others), then renamed into place.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, (contents, mode) in files.items():
            durable.remove_leftovers(path)
            try:
                staged.append((durable.write_temporary(path, contents, mode), path))
            except OSError as error:
                raise AgentError(f"cannot write the key files in {path.parent}: "
                                 f"{error.strerror}; no key file was changed") from None
        for temporary, path in staged:
            if os.path.lexists(path):
                os.rename(path, backup_name(path))
            os.rename(temporary, path)
        staged.clear()
    except OSError as error:
        raise AgentError(f"cannot write key files: {error.strerror}: {error.filename}") from None
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    for directory in {path.parent for path in files}:
        durable.sync_directory(directory)
