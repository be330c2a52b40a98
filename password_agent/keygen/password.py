# SPDX-License-Identifier: GPL-3.0-or-later
"""Getting the password to encrypt, and the host's SSH key for upstream's ssh-keyscan checker.

The password is bytes from start to end: read raw from ``--passfile`` (``-`` is standard input,
as ``cat`` reads it in upstream's keygen), or typed twice on the terminal (``/dev/tty``) with
echo off.  Unlike upstream's ``read``, we keep white space at either end of a typed password:
the disk prompt keeps it too, and upstream's man page calls its stripping a bug.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

from password_agent.errors import AgentError

TERMINAL = "/dev/tty"

#: The key types upstream asks ``ssh-keyscan`` for, in its order.
SSH_KEY_TYPES = ("ecdsa-sha2-nistp256", "ed25519", "rsa")
_SSH_KEYSCAN_TIMEOUT = 30.0


def read_passfile(name: str) -> bytearray:
    """The whole of file ``name`` (``-``: standard input), byte for byte."""
    try:
        if name == "-":
            return bytearray(sys.stdin.buffer.read())
        return bytearray(Path(name).read_bytes())
    except OSError as error:
        raise AgentError(f"cannot read password file {name}: {error.strerror}") from None


def prompt_password() -> bytearray:
    """The password typed twice on the terminal, with echo off; a mismatch is refused."""
    try:
        terminal = os.open(TERMINAL, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        raise AgentError("no terminal to ask for the password on; use --passfile") from None
    try:
        first = _read_hidden(terminal, b"Enter passphrase: ")
        second = _read_hidden(terminal, b"Repeat passphrase: ")
    finally:
        os.close(terminal)
    matched = first == second
    second[:] = bytes(len(second))
    if not matched:
        first[:] = bytes(len(first))
        raise AgentError("Passphrase mismatch")
    return first


def _read_hidden(terminal: int, prompt: bytes) -> bytearray:
    """One line from ``terminal`` with echo off, without its newline."""
    saved = termios.tcgetattr(terminal)
    quiet = termios.tcgetattr(terminal)
    quiet[3] &= ~termios.ECHO
    line = bytearray()
    termios.tcsetattr(terminal, termios.TCSAFLUSH, quiet)
    try:
        os.write(terminal, prompt)
        while not line.endswith(b"\n"):
            chunk = os.read(terminal, 1024)
            if not chunk:
                raise AgentError("no password typed")
            line += chunk
    except BaseException:
        line[:] = bytes(len(line))
        raise
    finally:
        termios.tcsetattr(terminal, termios.TCSAFLUSH, saved)
        os.write(terminal, b"\n")
    del line[-1:]
    return line


@dataclass(frozen=True)
class SshHostKey:
    """What ``ssh-keyscan -t TYPE localhost`` found: the type asked for and the key line."""

    key_type: str
    fingerprint: str

    def checker(self) -> str:
        """Upstream's checker line, verbatim (``%%(host)s`` survives the server's interpolation
        once, ``%(ssh_fingerprint)s`` is filled in from the section)."""
        return (f"ssh-keyscan -t {self.key_type} %%(host)s 2>/dev/null"
                " | grep --fixed-strings --line-regexp --quiet"
                ' --regexp=%%(host)s" %(ssh_fingerprint)s"')


def scan_local_ssh_key() -> SshHostKey | None:
    """This host's SSH key as upstream's keygen finds it, or None (with a notice when there is
    no ``ssh-keyscan`` to ask; upstream says nothing then)."""
    program = shutil.which("ssh-keyscan")
    if program is None:
        print("mandos-keygen: ssh-keyscan not found; no SSH checker in the section",
              file=sys.stderr)
        return None
    for key_type in SSH_KEY_TYPES:
        try:
            result = subprocess.run([program, "-t", key_type, "localhost"],
                                    stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=_SSH_KEYSCAN_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode != 0:
            continue
        for line in result.stdout.decode("ascii", errors="replace").splitlines():
            if line.startswith("localhost "):
                return SshHostKey(key_type, line.removeprefix("localhost "))
    return None
