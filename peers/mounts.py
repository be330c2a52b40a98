# SPDX-License-Identifier: GPL-3.0-or-later
"""A small tmpfs for one test, to make a full or read-only file system on purpose.

Mounted on a directory of the test's own temporary directory, in the test's mount namespace
(so that the code under test, its subprocesses and the test all see the same files), and
unmounted when the ``with`` ends, also on failure: a lazy unmount if something still holds it.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(directory: Path, size: str = "256k", mode: int = 0o700) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes (``mount -o size=``) on ``directory``, created if missing."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}", "tmpfs",
                    str(directory)], check=True, capture_output=True, timeout=10)
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True,
                          timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=True, capture_output=True,
                           timeout=10)


def remount(directory: Path, *, read_only: bool) -> None:
    """Make the tmpfs on ``directory`` read-only, or writable again."""
    subprocess.run(["mount", "-o", "remount," + ("ro" if read_only else "rw"), str(directory)],
                   check=True, capture_output=True, timeout=10)


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system of ``directory`` to the last byte with the file ``name``; remove
    that file to give the space back."""
    filler = directory / name
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    os.write(descriptor, b"\0" * chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(descriptor)
    return filler
