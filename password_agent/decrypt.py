"""Decrypting the blob: gpg, through python-gnupg, in a fresh private GnuPG home.

As upstream's client does: a temporary GNUPGHOME (0700) under ``/run`` (falling back to the
temporary directory), our ``pubkey.txt`` and ``seckey.txt`` imported, the blob decrypted, then
gpg-agent stopped and the home removed, also on failure.  The plaintext reaches us through gpg's
stdout pipe into a ``bytearray`` that the caller zeroes; it never touches a file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gnupg

from password_agent.errors import AgentError
from password_agent.gnupghome import private_home

log = logging.getLogger(__name__)

# python-gnupg logs imported key data at DEBUG level: keep it quiet whatever the agent's level.
logging.getLogger("gnupg").setLevel(logging.WARNING)


def _import(gpg: gnupg.GPG, path: Path) -> None:
    try:
        key_data = path.read_bytes()
    except OSError as error:
        raise AgentError(f"cannot read OpenPGP key file {path}: {error.strerror}; check "
                         "--pubkey/--seckey or --keydir") from None
    result = gpg.import_keys(key_data)
    if not result.count:
        raise AgentError(f"gpg imported no key from {path}; is it an OpenPGP key "
                         "(mandos-keygen's pubkey.txt/seckey.txt)?")


def decrypt_blob(blob: bytes, pubkey: Path, seckey: Path, run_directory: Path | None
                 ) -> bytearray:
    """The password in ``blob`` (binary OpenPGP, encrypted to our key), as a ``bytearray`` the
    caller zeroes after use; :class:`AgentError` if gpg cannot decrypt it."""
    plaintext = bytearray()

    def collect(chunk: bytes) -> bool:
        plaintext.extend(chunk)
        return False  # python-gnupg keeps nothing

    with private_home("gnupg.", run_directory) as home:
        try:
            gpg = gnupg.GPG(gnupghome=str(home))
        except (OSError, ValueError, RuntimeError) as error:
            raise AgentError(f"cannot run gpg (Debian package gnupg): {error}") from None
        gpg.on_data = collect
        _import(gpg, pubkey)
        _import(gpg, seckey)
        result = gpg.decrypt(blob, always_trust=True)
        if not result.ok:
            plaintext[:] = bytes(len(plaintext))
            status = result.status or "no status"
            raise AgentError(f"gpg cannot decrypt the server's blob ({status}); was the "
                             "secret made for this key set?")
        return plaintext
