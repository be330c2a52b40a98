"""The record of answers already sent, so that the agent never sends the same password twice to
the same request ``Id``.

A wrong password makes systemd-cryptsetup ask again with the same ``Id``; sending the same
password again would only use up the human's tries.  The agent is restarted by its ``.path``
unit, so the record lives in a root-only file under ``/run`` as well as in memory.  It holds an
HMAC-SHA256 of ``Id`` and password under a random key, never the password.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

_KEY_PREFIX = "key="
_HEADER = "# mandos-password-agent: keyed hashes of (Id, password) answered; no passwords\n"


class AnsweredRecord:
    """Keyed hashes of (request Id, password) pairs sent, in memory and in ``path`` (0600)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._key = secrets.token_bytes(32)
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
        with os.fdopen(descriptor, "r+", encoding="ascii") as stream:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if os.fstat(descriptor).st_uid != os.geteuid():
                raise PermissionError(1, "not our file")
            os.fchmod(descriptor, 0o600)
            key: bytes | None = None
            for line in stream.read().splitlines():
                if line.startswith(_KEY_PREFIX) and key is None:
                    key = bytes.fromhex(line[len(_KEY_PREFIX):])
                elif line and not line.startswith("#"):
                    self._digests.add(line)
            if key is None:
                stream.write(f"{_HEADER}{_KEY_PREFIX}{self._key.hex()}\n")
                self._digests.clear()  # hashes under an unknown key mean nothing
            else:
                self._key = key

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
