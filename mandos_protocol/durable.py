# SPDX-License-Identifier: GPL-3.0-or-later
"""Writing files so that a crash or a power cut leaves the old file or the new one, never half.

Both sides keep files that must survive a power cut whole: the server's state file and the
key files ``mandos-keygen`` writes.  The recipe is the same for both: write the contents to a
temporary file beside the final name (created private, then given its final mode, so a
secret is never readable by others for a moment), fsync it, rename it into place, then fsync
the directory so that the rename itself is on disk.

A process killed between creating the temporary file and renaming it leaves the temporary
behind (``SIGKILL``, a power cut): :func:`remove_leftovers` removes those of a file before it is
written again, so that they do not pile up, nor keep a secret in a file nobody looks at.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_SUFFIX = ".tmp"


def _prefix(path: Path) -> str:
    return f".{path.name}."


def write_temporary(path: Path, contents: bytes, mode: int) -> Path:
    """A new, synced file beside ``path`` (a hidden name ending in ``.tmp``) holding
    ``contents`` with ``mode`` exactly (whatever the umask); removed again if writing fails.
    The caller renames it into place and then calls :func:`sync_directory`."""
    descriptor, name = tempfile.mkstemp(prefix=_prefix(path), suffix=_SUFFIX, dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(contents)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return temporary


def remove_leftovers(path: Path) -> int:
    """Remove the temporary files of ``path`` that an interrupted writer left (call it only
    where no other process writes ``path`` at the same time); returns how many.  One that
    cannot be removed (a read-only directory) is left: it is harmless but for its space."""
    removed = 0
    prefix = _prefix(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        middle = name[len(prefix):-len(_SUFFIX)]
        # mkstemp's part: 8 characters, no dot (not the temporary of a longer file name).
        if name.startswith(prefix) and name.endswith(_SUFFIX) and len(middle) == 8 \
                and "." not in middle:
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                removed += 1
    return removed


def sync_directory(directory: Path) -> None:
    """fsync ``directory``, so that renames into it are durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace(path: Path, contents: bytes, mode: int) -> None:
    """Make ``path`` hold ``contents`` with ``mode``, atomically and durably: readers see the
    old file or the new one, and after a power cut so does the next boot."""
    temporary = write_temporary(path, contents, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    sync_directory(path.parent)
