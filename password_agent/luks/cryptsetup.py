# SPDX-License-Identifier: GPL-3.0-or-later
"""Running ``cryptsetup``: the one place that starts it, hands it secrets through pipes and
turns its failures into one-line errors.

A secret (the new random key, or a key to test) never goes into an argv, the environment or a
file: it is written whole into a pipe before cryptsetup starts (a key is far smaller than a
pipe's buffer), and cryptsetup reads the pipe as its standard input (``--key-file -``) or as
``/dev/fd/N``.  The administrator's passphrase never passes through this process at all:
cryptsetup reads it itself, from the terminal, standard input or ``--key-file``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from password_agent.errors import AgentError

CRYPTSETUP = "cryptsetup"
#: The key-derivation of a Mandos keyslot.  The key is 384 random bits: stretching it adds no
#: strength, only boot time and, with argon2's default of up to 1 GiB, a risk of the
#: initramfs running out of memory.  systemd-cryptenroll does the same for its TPM2, FIDO2 and
#: PKCS#11 keys.
MINIMAL_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
#: cryptsetup's exit status for "no key available with this passphrase" (EPERM).
WRONG_PASSPHRASE = 2
#: cryptsetup's exit status for a device that does not exist or cannot be opened.
NO_DEVICE = 4


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    #: cryptsetup's last line of complaint (empty when its stderr went to the terminal).
    complaint: str


def _pipe_holding(secret: bytes | bytearray) -> int:
    """The read end of a pipe that holds ``secret`` and then end-of-file."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        written = os.write(write_end, secret)
        if written != len(secret):
            raise AgentError("cannot pass the key to cryptsetup: the pipe is full")
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def run(arguments: Sequence[str], *, stdin_data: bytes | bytearray | None = None,
        fd_data: bytes | bytearray | None = None, ask_user: bool = False) -> Result:
    """``cryptsetup ARGUMENTS``.  ``stdin_data`` is its standard input; ``fd_data`` is
    readable as ``/dev/fd/N``, which replaces the literal ``{fd}`` in ``arguments``.  With
    ``ask_user`` cryptsetup reads the administrator's passphrase from our standard input, and
    if that is a terminal its prompts and complaints go to it."""
    descriptors: list[int] = []
    try:
        stdin: int | None = subprocess.DEVNULL
        if stdin_data is not None:
            stdin = _pipe_holding(stdin_data)
            descriptors.append(stdin)
        elif ask_user:
            stdin = None
        argv = [CRYPTSETUP, *arguments]
        if fd_data is not None:
            fd = _pipe_holding(fd_data)
            descriptors.append(fd)
            argv = [argument.replace("{fd}", str(fd)) for argument in argv]
        interactive = ask_user and sys.stdin.isatty()
        try:
            completed = subprocess.run(
                argv, stdin=stdin, stdout=subprocess.PIPE,
                stderr=None if interactive else subprocess.PIPE,
                pass_fds=descriptors, check=False)
        except FileNotFoundError:
            raise AgentError("cryptsetup is not installed (Debian package cryptsetup-bin)"
                             ) from None
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
    stderr = (completed.stderr or b"").decode(errors="replace").strip()
    complaint = stderr.splitlines()[-1] if stderr else ""
    return Result(completed.returncode, completed.stdout.decode(errors="replace"), complaint)


def checked(arguments: Sequence[str], what: str, *,
            stdin_data: bytes | bytearray | None = None,
            fd_data: bytes | bytearray | None = None, ask_user: bool = False) -> Result:
    """:func:`run`, raising :class:`AgentError` (``what`` failed, and cryptsetup's reason) on
    failure."""
    result = run(arguments, stdin_data=stdin_data, fd_data=fd_data, ask_user=ask_user)
    if result.returncode != 0:
        reason = result.complaint or f"exit status {result.returncode}"
        raise AgentError(f"{what} failed: {reason}")
    return result
