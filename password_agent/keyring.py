# SPDX-License-Identifier: GPL-3.0-or-later
"""Our user's kernel keyring (``@u``), through the ``add_key(2)`` and ``keyctl(2)`` system
calls: glibc has no wrappers for them, and libkeyutils would be one more library in the
initramfs for three calls.

The user keyring is the one that outlives the process that fills it: systemd gives every
service a fresh session keyring of its own (``KeyringMode=private``, the default for system
services), and session, process and thread keyrings die with it, whereas the user keyring of
root lives as long as the kernel, across service restarts and switch-root.  Any process of the
same uid (in the same user namespace) can read it: it is a place that is not a file, not a
place that hides from root.

A key is read, and its expiry set, only by a process that *possesses* it: one that reaches it
from its own thread, process or session keyring.  A service's private session keyring does not
lead to the user keyring (``KeyringMode=shared`` would link it there), so every call first
links the user keyring into our process keyring, which is this process's alone and goes with
it; without that, systemd's services get ``EACCES`` (found under systemd in
tests/vm/test_server_units.py).

Errors are :class:`OSError` with the call's ``errno``; where the system calls do not exist here
(an architecture missing from the table, a seccomp filter such as a container runtime's),
that is ``ENOSYS`` or ``EPERM``, and the caller does without.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

#: The system call numbers of ``add_key`` and ``keyctl``, by the interpreter's Debian multiarch
#: tuple (its ABI, which a 32-bit userland on a 64-bit kernel makes differ from ``uname -m``).
_SYSCALLS = {
    "x86_64-linux-gnu": (248, 250),
    "i386-linux-gnu": (286, 288),
    "aarch64-linux-gnu": (217, 219),
    "riscv64-linux-gnu": (217, 219),
    "loongarch64-linux-gnu": (217, 219),
    "arm-linux-gnueabihf": (309, 311),
    "arm-linux-gnueabi": (309, 311),
    "powerpc64le-linux-gnu": (269, 271),
    "powerpc64-linux-gnu": (269, 271),
    "s390x-linux-gnu": (278, 280),
}
_KEY_SPEC_PROCESS_KEYRING = -2
_KEY_SPEC_USER_KEYRING = -4
_KEYCTL_LINK = 8
_KEYCTL_SEARCH = 10
_KEYCTL_READ = 11
_KEYCTL_SET_TIMEOUT = 15
_KEYCTL_INVALIDATE = 21
#: What a search answers for a key that is not there (any more).
_GONE = (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED)
#: The type of the keys kept: a blob that only its possessor reads.
_TYPE = b"user"


def _syscall(which: int, *arguments: int | bytes | ctypes.Array[ctypes.c_char]) -> int:
    numbers = _SYSCALLS.get(getattr(sys.implementation, "_multiarch", ""))
    if numbers is None:
        raise OSError(errno.ENOSYS, "kernel keyring: no system call numbers known for this "
                      "architecture")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    converted = [ctypes.c_long(argument) if isinstance(argument, int) else argument
                 for argument in arguments]
    result = libc.syscall(ctypes.c_long(numbers[which]), *converted)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"kernel keyring: {os.strerror(code)}")
    return int(result)


def _add_key(description: bytes, payload: bytes) -> int:
    return _syscall(0, _TYPE, description, payload, len(payload), _KEY_SPEC_USER_KEYRING)


def _keyctl(*arguments: int | bytes | ctypes.Array[ctypes.c_char]) -> int:
    return _syscall(1, *arguments)


def _possess() -> None:
    """Make the keys in the user keyring ours to read (see the module's docstring)."""
    _keyctl(_KEYCTL_LINK, _KEY_SPEC_USER_KEYRING, _KEY_SPEC_PROCESS_KEYRING)


def store(description: str, payload: bytes, lifetime: int) -> None:
    """Put ``payload`` under ``description`` in the user keyring, replacing the payload of a key
    already there, to expire ``lifetime`` seconds from now."""
    _possess()
    serial = _add_key(os.fsencode(description), payload)
    _keyctl(_KEYCTL_SET_TIMEOUT, serial, lifetime)


def load(description: str, size: int, lifetime: int) -> bytes | None:
    """The payload (at most ``size`` bytes) under ``description`` in the user keyring, its
    expiry pushed to ``lifetime`` seconds from now; ``None`` if there is no such key (any
    more)."""
    _possess()
    try:
        serial = _keyctl(_KEYCTL_SEARCH, _KEY_SPEC_USER_KEYRING, _TYPE,
                         os.fsencode(description), 0)
        buffer = ctypes.create_string_buffer(size)
        length = _keyctl(_KEYCTL_READ, serial, buffer, size)
        _keyctl(_KEYCTL_SET_TIMEOUT, serial, lifetime)
    except OSError as error:
        if error.errno in _GONE:
            return None
        raise
    payload = buffer.raw[:min(length, size)]
    ctypes.memset(buffer, 0, size)
    return payload


def discard(description: str) -> None:
    """Remove the key under ``description`` from the user keyring at once, if it is there
    (for whoever removes what the key belongs to: the tests, their run directories)."""
    _possess()
    try:
        serial = _keyctl(_KEYCTL_SEARCH, _KEY_SPEC_USER_KEYRING, _TYPE,
                         os.fsencode(description), 0)
        _keyctl(_KEYCTL_INVALIDATE, serial)
    except OSError as error:
        if error.errno not in _GONE:
            raise
