# SPDX-License-Identifier: GPL-3.0-or-later
"""The client's OpenPGP key pair, and passwords encrypted to it, with python-gnupg and ``gpg``.

Everything happens in a throw-away GNUPGHOME (a fresh 0700 directory); its gpg-agent is stopped
and the directory removed afterwards, so that no key material outlives the command except the
files we mean to write.  Upstream's keygen makes RSA-4096 keys; ours default to an ed25519
primary key with a cv25519 encryption subkey (the same usages: sign+auth, and encrypt), which
gpg makes in milliseconds; ``-t RSA -s RSA`` gives upstream's kind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gnupg

from password_agent import stopsignal
from password_agent.errors import AgentError
from password_agent.gnupghome import private_home

DEFAULT_KEY_TYPE = "ed25519"
DEFAULT_SUBKEY_TYPE = "cv25519"
DEFAULT_LENGTH = 4096
#: Upstream refuses shorter primary keys with "Invalid key length".
MIN_LENGTH = 512

#: What the armour of an encrypted password says, as upstream's keygen writes it.
SECRET_COMMENT = "Encrypted password for a Mandos client"

_HOME_PREFIX = "mandos-keygen-"
#: gpg's own messages may start with where in its input it was: "-:8: invalid expire date".
_GPG_INPUT_POSITION = re.compile(r"^-:[0-9]+: ")
_CRC24_LINE = re.compile(r"=[A-Za-z0-9+/]{4}")


@dataclass(frozen=True)
class Algorithm:
    """A gpg batch ``Key-Type`` plus either a curve or (for RSA, DSA, ELG) a length."""

    gpg_type: str
    curve: str | None = None


#: ``-t`` names: upstream passes any gpg ``Key-Type``; we accept the signing kinds by name.
PRIMARY_TYPES: dict[str, Algorithm] = {
    "ed25519": Algorithm("EDDSA", "ed25519"),
    "eddsa": Algorithm("EDDSA", "ed25519"),
    "nistp256": Algorithm("ECDSA", "nistp256"),
    "nistp384": Algorithm("ECDSA", "nistp384"),
    "nistp521": Algorithm("ECDSA", "nistp521"),
    "rsa": Algorithm("RSA"),
    "dsa": Algorithm("DSA"),
}

#: ``-s`` names: the encryption kinds.
SUBKEY_TYPES: dict[str, Algorithm] = {
    "cv25519": Algorithm("ECDH", "cv25519"),
    "ecdh": Algorithm("ECDH", "cv25519"),
    "nistp256": Algorithm("ECDH", "nistp256"),
    "nistp384": Algorithm("ECDH", "nistp384"),
    "nistp521": Algorithm("ECDH", "nistp521"),
    "rsa": Algorithm("RSA"),
    "elg-e": Algorithm("ELG-E"),
    "elg": Algorithm("ELG-E"),
}


@dataclass(frozen=True)
class KeySpec:
    """What ``-t -l -s -L -n -e -c -x`` ask for."""

    name: str
    key_type: str = DEFAULT_KEY_TYPE
    length: int = DEFAULT_LENGTH
    subkey_type: str = DEFAULT_SUBKEY_TYPE
    sublength: int = DEFAULT_LENGTH
    email: str = ""
    comment: str = ""
    expire: str = "0"

    def batch(self) -> str:
        """The ``gpg --gen-key --batch`` parameters, checked first.

        Written here rather than with ``GPG.gen_key_input``, which invents a ``Name-Email`` of
        ``user@host`` when none is given; upstream's key has no e-mail unless ``-e`` says so.
        """
        primary = _algorithm(PRIMARY_TYPES, self.key_type, "key")
        subkey = _algorithm(SUBKEY_TYPES, self.subkey_type, "subkey")
        if not self.name:
            raise AgentError("Empty key name")
        if self.length < MIN_LENGTH:
            raise AgentError("Invalid key length")
        if self.sublength < MIN_LENGTH:
            raise AgentError("Invalid subkey length")
        if not self.expire:
            raise AgentError("Empty key expiration")
        for what, value in (("name", self.name), ("e-mail address", self.email),
                            ("comment", self.comment), ("expire time", self.expire)):
            if not value.isprintable():
                raise AgentError(f"the key {what} must be one line of printable text")
        lines = [*_algorithm_lines("Key", primary, self.length), "Key-Usage: sign,auth",
                 *_algorithm_lines("Subkey", subkey, self.sublength), "Subkey-Usage: encrypt",
                 f"Name-Real: {self.name}"]
        if self.comment:
            lines.append(f"Name-Comment: {self.comment}")
        if self.email:
            lines.append(f"Name-Email: {self.email}")
        lines += [f"Expire-Date: {self.expire}", "%no-protection", "%commit"]
        return "".join(line + "\n" for line in lines)

    def file_comment(self) -> str:
        """The armour comment of ``pubkey.txt`` and ``seckey.txt``, as upstream writes it."""
        comment = f"Mandos client key for {self.name}"
        if self.comment:
            comment += f" ({self.comment})"
        if self.email:
            comment += f" <{self.email}>"
        return comment


def _algorithm(table: dict[str, Algorithm], name: str, what: str) -> Algorithm:
    try:
        return table[name.lower()]
    except KeyError:
        choices = ", ".join(table)
        raise AgentError(f"unknown OpenPGP {what} type {name!r}; use one of {choices}") from None


def _algorithm_lines(prefix: str, algorithm: Algorithm, length: int) -> list[str]:
    size = (f"{prefix}-Curve: {algorithm.curve}" if algorithm.curve
            else f"{prefix}-Length: {length}")
    return [f"{prefix}-Type: {algorithm.gpg_type}", size]


@dataclass(frozen=True)
class OpenPgpKeyPair:
    """The contents of ``pubkey.txt`` and ``seckey.txt``, and the primary key's fingerprint."""

    public_armor: bytes
    secret_armor: bytes
    fingerprint: str


@dataclass(frozen=True)
class EncryptedSecret:
    """A password encrypted and signed to a client's key, and that key's fingerprint."""

    fingerprint: str
    armored: str


def _gpg(home: Path, options: Sequence[str] = ()) -> gnupg.GPG:
    """python-gnupg on ``home``; ``options`` go before every command (e.g. ``--comment``)."""
    try:
        return gnupg.GPG(gnupghome=str(home), encoding="utf-8",
                         options=["--no-options", *options])
    except (OSError, ValueError) as error:
        raise AgentError(f"cannot run gpg ({error}); install gnupg") from None


def _gpg_complaint(stderr: str) -> str:
    """gpg's last own message (not a status line), for an error the user can act on."""
    messages = [_GPG_INPUT_POSITION.sub("", line.removeprefix("gpg: "), count=1)
                for line in stderr.splitlines() if line.startswith("gpg: ")]
    return messages[-1] if messages else "no reason given"


def generate_openpgp_key(spec: KeySpec) -> OpenPgpKeyPair:
    """A new key pair as ``spec`` asks, exported armoured and minimal, as upstream does."""
    batch = spec.batch()
    with private_home(_HOME_PREFIX) as home:
        result = _gpg(home).gen_key(batch)
        fingerprint = str(result.fingerprint or "")
        if not fingerprint:
            complaint = _gpg_complaint(result.stderr)
            raise AgentError(f"gpg could not make the OpenPGP key: {complaint}")
        exporter = _gpg(home, ["--comment", spec.file_comment()])
        public = exporter.export_keys(fingerprint, armor=True, minimal=True)
        secret = exporter.export_keys(fingerprint, secret=True, armor=True, minimal=True,
                                      expect_passphrase=False)
        stopsignal.check()  # a SIGTERM during gpg: stop here, removing the home
    if not public or not secret:
        raise AgentError("gpg could not export the new OpenPGP key")
    return OpenPgpKeyPair(public_armor=public.encode("ascii"),
                          secret_armor=secret.encode("ascii"), fingerprint=fingerprint)


def encrypt_to_own_key(public_armor: bytes, secret_armor: bytes,
                       password: bytes | bytearray) -> EncryptedSecret:
    """``password`` encrypted to, and signed by, the client's key (``gpg --encrypt --sign``).

    The password goes to gpg's standard input and nowhere else.  As upstream, the fingerprint
    is the first key's in the imported key files.
    """
    with private_home(_HOME_PREFIX) as home:
        gpg = _gpg(home)
        for armor in (secret_armor, public_armor):
            imported = gpg.import_keys(bytes(armor))
            if not imported.fingerprints:
                raise AgentError(
                    f"gpg could not read the client's key: {_gpg_complaint(imported.stderr)}")
        keys = gpg.list_keys()
        if not keys:
            raise AgentError("the key files hold no OpenPGP key")
        fingerprint = str(keys[0]["fingerprint"])
        result = gpg.encrypt(password, [fingerprint], sign=fingerprint, armor=True,
                             always_trust=True, extra_args=["--comment", SECRET_COMMENT])
        stopsignal.check()
        if not result.ok:
            complaint = _gpg_complaint(result.stderr)
            raise AgentError(f"gpg could not encrypt the password: {complaint}")
        return EncryptedSecret(fingerprint=fingerprint, armored=result.data.decode("ascii"))


def armor_body(armored: str) -> list[str]:
    """The base64 lines of an armoured PGP message, without headers and CRC-24 line.

    This is exactly what upstream's keygen puts under ``secret =`` (its ``sed`` takes the lines
    after the blank line that ends the armour headers and drops the ``=XXXX`` checksum).
    """
    lines = armored.splitlines()
    try:
        begin = lines.index("-----BEGIN PGP MESSAGE-----")
        end = lines.index("-----END PGP MESSAGE-----", begin)
        block = lines[begin + 1 : end]
        body = block[block.index("") + 1 :]
    except ValueError:
        raise AgentError("gpg wrote no armoured message") from None
    return [line for line in body if line and not _CRC24_LINE.fullmatch(line)]
