"""Writing files so that a crash or a power cut leaves the old file or the new one, never half.

Both sides keep files that must survive a power cut whole: the server's state file and the
key files ``mandos-keygen`` writes.  The recipe is the same for both: write the contents to a
temporary file beside the final name (created private, then given its final mode, so a
secret is never readable by others for a moment), fsync it, rename it into place, then fsync
the directory so that the rename itself is on disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_temporary(path: Path, contents: bytes, mode: int) -> Path:
    """A new, synced file beside ``path`` (a hidden name ending in ``.tmp``) holding
    ``contents`` with ``mode`` exactly (whatever the umask); removed again if writing fails.
    The caller renames it into place and then calls :func:`sync_directory`."""
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
