# SPDX-License-Identifier: GPL-3.0-or-later
"""The record of answers already sent, so that the agent never sends the same password twice to
the same request ``Id``.

A wrong password makes systemd-cryptsetup ask again with the same ``Id``; sending the same
password again would only use up the human's tries.  The agent is restarted by its ``.path``
unit, so the record lives in a root-only file under ``/run`` as well as in memory.  It holds an
HMAC-SHA256 of ``Id`` and password under a random key, never the password, and never the key:
with the key beside them, whoever reads the file could test guesses at the password at
SHA-256 speed instead of at the speed of the volume's key derivation.

The key lives in root's kernel keyring (:mod:`password_agent.keyring`), under a name made of
the file's path, for a day after the last agent that opened the record: the user keyring
outlives every agent, since systemd's private session keyrings (``KeyringMode=``) do not
matter to it, and it outlives switch-root, like ``/run``, so the booted system's agent reads
the record that the initramfs's agent wrote.  A day is far longer than a requester's tries;
the expiry only keeps the key of a record that was removed (a test's, another
``--run-directory``) from staying in the keyring until the next boot.  Not a slow key
derivation instead: to be as slow to guess against as LUKS's own, it would add a second or
more to every unlock, and the initramfs has no scrypt (it ships without OpenSSL's
``_hashlib``).

The file is trusted only in the current format and with its key found: a file without (a
record of an older agent, which kept its key in the file; a key that expired; a new boot with
an old file) is emptied and started afresh, since hashes under an unknown key mean nothing.
Where the kernel keyring cannot be used, answers are remembered only until the agent exits:
a restarted agent may then send a password once more, and the human still answers.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

from password_agent import keyring

log = logging.getLogger(__name__)

#: The file's first line, which names its format: the key is elsewhere.
_HEADER = ("# mandos-password-agent answered v2: HMAC-SHA256 of (Id, password) for each "
           "answer sent, under a key in root's kernel keyring; no passwords, no key\n")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KEY_BYTES = 32
#: How long the key outlives the last agent that opened the record, in seconds.
KEY_LIFETIME = 24 * 3600


def key_description(path: Path) -> str:
    """The name of the key of the record in ``path`` in root's kernel keyring."""
    return f"mandos-password-agent:{os.path.abspath(path)}"


class AnsweredRecord:
    """Keyed hashes of (request Id, password) pairs sent, in memory and in ``path`` (0600)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._key = secrets.token_bytes(_KEY_BYTES)
        self._digests: set[str] = set()
        if path is not None:
            try:
                self._load_or_create(path)
            except OSError as error:
                log.warning("cannot use %s (%s); remembering answers only until exit",
                            path, error.strerror)
                self.path = None

    def _load_or_create(self, path: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(path, flags, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if os.fstat(descriptor).st_uid != os.geteuid():
                raise PermissionError(1, "not our file")
            os.fchmod(descriptor, 0o600)
            lines = _read_all(descriptor).decode("ascii", "replace").splitlines(keepends=True)
            description = key_description(path)
            if lines[:1] == [_HEADER]:
                key = keyring.load(description, _KEY_BYTES, KEY_LIFETIME)
                if key is not None and len(key) == _KEY_BYTES:
                    self._key = key
                    self._digests = {line.strip() for line in lines[1:]
                                     if _DIGEST.fullmatch(line.strip())}
                    return
                log.info("the key of %s is not in the kernel keyring (expired, or another "
                         "boot's record); starting a new record", path)
            elif lines:
                log.info("%s is not a record of this agent's format (an older agent's keeps "
                         "its key in the file); starting a new record", path)
            os.ftruncate(descriptor, 0)  # hashes under an unknown key mean nothing
            keyring.store(description, self._key, KEY_LIFETIME)
            os.write(descriptor, _HEADER.encode("ascii"))
        finally:
            os.close(descriptor)

    def _digest(self, request_key: str, password: bytes | bytearray) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        mac.update(request_key.encode("utf-8", "surrogateescape"))
        mac.update(b"\0")
        mac.update(password)
        return mac.hexdigest()

    def contains(self, request_key: str, password: bytes | bytearray) -> bool:
        """Whether ``password`` was already sent to the request ``request_key``."""
        return self._digest(request_key, password) in self._digests

    def add(self, request_key: str, password: bytes | bytearray) -> None:
        """Remember that ``password`` is being sent to ``request_key`` (call before sending:
        if the agent dies in between, the human answers, which is the safe side)."""
        digest = self._digest(request_key, password)
        self._digests.add(digest)
        if self.path is None:
            return
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
                                 | os.O_CLOEXEC)
            try:
                os.write(descriptor, f"{digest}\n".encode())
            finally:
                os.close(descriptor)
        except OSError as error:
            log.warning("cannot record the answer in %s (%s); a restarted agent could send "
                        "it again", self.path, error.strerror)


def _read_all(descriptor: int) -> bytes:
    chunks = []
    while chunk := os.read(descriptor, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
