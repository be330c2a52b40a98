# SPDX-License-Identifier: GPL-3.0-or-later
"""Decrypting the blob: gpg, through python-gnupg, in a private GnuPG home prepared ahead.

As upstream's client does: a temporary GNUPGHOME (0700) under ``/run`` (falling back to the
temporary directory) with our ``pubkey.txt`` and ``seckey.txt`` imported; the blob is decrypted
there, then gpg-agent is stopped and the home removed, also on failure.

Preparing the home does not need the blob, and it is most of gpg's time: python-gnupg's
``gpg --list-config`` probe (its constructor always runs it), then one ``gpg --import`` of both
key files, which starts gpg-agent.  So a :class:`Decryptor` prepares it in a background thread
from the moment a request is pending, while the agent connects and fetches; only the
decryption itself (gpg-agent's RSA operation) is left between the blob and the answer.  The
home is kept while requests stay pending (over retries, as upstream's client keeps its GPGME
home), and removed once none is, after the answer went out; a resident agent (``--watch``)
prepares it before any request, waits for it with :meth:`Decryptor.wait_ready`, and keeps it
until it exits.

The plaintext reaches us through gpg's stdout pipe into a ``bytearray`` that the caller zeroes;
it never touches a file.  The blob comes from the network, and before the TLS handshake nothing
says who sent it (any Zeroconf responder on the LAN can answer): a compressed OpenPGP message of
a few hundred bytes inflates to gigabytes, which in the initramfs means the OOM killer.  So gpg
may write at most :data:`MAX_PLAINTEXT` bytes (``--max-output``), the collection stops keeping
data past that even if gpg did not, and a result counts only if gpg decrypted a message
encrypted to a public key (``ENC_TO``, then ``DECRYPTION_OKAY``): a stored or signed literal,
or a symmetrically encrypted message (``--pinentry-mode error``: nobody is there to type a
passphrase), is refused.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import gnupg

from password_agent.errors import AgentError
from password_agent.gnupghome import make_home, remove_home

log = logging.getLogger(__name__)

# python-gnupg logs imported key data at DEBUG level: keep it quiet whatever the agent's level.
logging.getLogger("gnupg").setLevel(logging.WARNING)

#: The name of each GnuPG home in the run directory starts so.
HOME_PREFIX = "gnupg."

#: The most plaintext accepted: a disk password is at most a few KiB.
MAX_PLAINTEXT = 64 * 1024

#: gpg's options for the decryption: bounded output, never a passphrase prompt.
_DECRYPT_OPTIONS = ["--max-output", str(MAX_PLAINTEXT), "--pinentry-mode", "error"]

#: How long closing waits for an unfinished preparation before stopping gpg-agent regardless
#: (an agent started after that exits by itself when its home is removed).
_PREPARE_JOIN_TIMEOUT = 10.0


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise AgentError(f"cannot read OpenPGP key file {path}: {error.strerror}; check "
                         "--pubkey/--seckey or --keydir") from None


class Decryptor:
    """A private GnuPG home with our key pair, prepared in the background from construction
    on; :meth:`decrypt` waits for it.  :meth:`close` (or leaving the ``with`` block) stops its
    gpg-agent and removes it."""

    def __init__(self, pubkey: Path, seckey: Path, run_directory: Path | None) -> None:
        self._home = make_home(HOME_PREFIX, run_directory)
        self._gpg: gnupg.GPG | None = None
        self._failure: Exception | None = None
        self._preparing = threading.Thread(target=self._prepare, args=(pubkey, seckey),
                                           name="gnupg-home", daemon=True)
        self._preparing.start()

    def __enter__(self) -> Decryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self, pubkey: Path, seckey: Path) -> None:
        """The background part: construct the GPG object, import both key files at once."""
        try:
            key_data = _read_key(pubkey) + b"\n" + _read_key(seckey)
            try:
                gpg = gnupg.GPG(gnupghome=str(self._home))
            except (OSError, ValueError, RuntimeError) as error:
                raise AgentError(f"cannot run gpg (Debian package gnupg): {error}") from None
            result = gpg.import_keys(key_data)
            if not result.sec_read:
                raise AgentError(f"gpg imported no secret key from {seckey} (and {pubkey}); "
                                 "are they OpenPGP keys (mandos-keygen's pubkey.txt/"
                                 "seckey.txt)?")
            self._gpg = gpg
        except Exception as error:  # handed to decrypt(), in the agent's thread
            self._failure = error

    def wait_ready(self) -> None:
        """Wait until the home is prepared (keys imported, gpg-agent running); the
        preparation's failure, if it failed."""
        self._preparing.join()
        if self._failure is not None:
            raise self._failure

    def decrypt(self, blob: bytes) -> bytearray:
        """The password in ``blob`` (binary OpenPGP, encrypted to our key), as a ``bytearray``
        the caller zeroes after use; :class:`AgentError` if gpg cannot decrypt it."""
        self.wait_ready()
        gpg = self._gpg
        assert gpg is not None
        plaintext = bytearray()
        overflow = False

        def collect(chunk: bytes) -> bool:
            nonlocal overflow
            if len(plaintext) + len(chunk) > MAX_PLAINTEXT:
                overflow = True  # keep reading (gpg must not block), keep nothing
            elif not overflow:
                plaintext.extend(chunk)
            return False  # python-gnupg keeps nothing

        gpg.on_data = collect
        try:
            result = gpg.decrypt(blob, always_trust=True, extra_args=_DECRYPT_OPTIONS)
        finally:
            gpg.on_data = None
        problem = None
        if overflow or "max-output" in (result.stderr or ""):
            problem = f"its plaintext is larger than {MAX_PLAINTEXT} bytes"
        elif not result.ok:
            problem = f"gpg cannot decrypt it ({result.status or 'no status'}); was the " \
                      "secret made for this key set?"
        elif not getattr(result, "key_id", None):
            problem = "it is not encrypted to a public key"
        if problem is not None:
            plaintext[:] = bytes(len(plaintext))
            raise AgentError(f"refusing the server's blob: {problem}")
        return plaintext

    def close(self) -> None:
        """Stop gpg-agent and remove the home (once the preparation is over)."""
        self._preparing.join(_PREPARE_JOIN_TIMEOUT)
        remove_home(self._home)
