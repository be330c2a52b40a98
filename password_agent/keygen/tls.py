# SPDX-License-Identifier: GPL-3.0-or-later
"""TLS raw-public-key pairs for a Mandos client, made with ``cryptography``.

Upstream's keygen runs ``certtool --generate-privkey --sec-param ultra --key-type=TYPE --pkcs8``
and then ``certtool --pubkey-info``.  We write the same two files: an unencrypted PKCS#8 PEM
private key and an SPKI PEM public key.  The ``-T`` names are certtool's; ``ultra`` makes
certtool pick SECP384R1 for ECDSA and 8192 bits for RSA, so we do the same.  Certtool's other
types (rsa-pss, the GOST ones) are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

if TYPE_CHECKING:
    # Only for the annotation: cryptography has this name since 40, Debian 12 ships 38.
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mandos_protocol.wire import key_id
from password_agent.errors import AgentError

#: Upstream's default ``--tls-keytype``.
DEFAULT_TLS_KEY_TYPE = "ed25519"

#: Certtool's ``--sec-param ultra`` sizes, which upstream's keygen asks for.
_RSA_BITS = 8192
_ECDSA_CURVE = ec.SECP384R1()

_GENERATORS: dict[str, Callable[[], PrivateKeyTypes]] = {
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "ecdsa": lambda: ec.generate_private_key(_ECDSA_CURVE),
    "ecc": lambda: ec.generate_private_key(_ECDSA_CURVE),
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS),
}

#: Key types that upstream's certtool accepts but we do not make.
_CERTTOOL_ONLY = ("rsa-pss", "gost01", "gost12-256", "gost12-512")


@dataclass(frozen=True)
class TlsKeyPair:
    """The contents of ``tls-privkey.pem`` and ``tls-pubkey.pem``."""

    private_pem: bytes
    public_pem: bytes

    @property
    def key_id(self) -> str:
        """The key id upstream's server computes for this key."""
        return key_id_of_pem(self.public_pem)


def tls_key_types() -> tuple[str, ...]:
    """The ``-T`` names we accept, for help and error messages."""
    return tuple(_GENERATORS)


def check_tls_key_type(name: str) -> str:
    """The canonical ``-T`` name for ``name`` (certtool ignores case too), or a clear error."""
    canonical = name.lower()
    if canonical in _GENERATORS:
        return canonical
    choices = ", ".join(_GENERATORS)
    if canonical in _CERTTOOL_ONLY:
        raise AgentError(f"TLS key type {name!r} is not supported here; use one of {choices}")
    raise AgentError(f"unknown TLS key type {name!r}; use one of {choices}")


def generate_tls_key(key_type: str) -> TlsKeyPair:
    """A new key pair of ``key_type`` (a name :func:`check_tls_key_type` accepts)."""
    private_key = _GENERATORS[check_tls_key_type(key_type)]()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TlsKeyPair(private_pem=private_pem, public_pem=public_pem)


def key_id_of_pem(public_pem: bytes) -> str:
    """The key id of a ``-----BEGIN PUBLIC KEY-----`` file: SHA-256 of its DER SPKI.

    Parsing with ``cryptography`` (rather than slicing base64) rejects a file that is not a key,
    so a broken ``tls-pubkey.pem`` is reported instead of yielding a key id nobody presents.
    """
    try:
        public_key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AgentError("the TLS public key is not a PEM SubjectPublicKeyInfo") from None
    return key_id(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
