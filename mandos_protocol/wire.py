# SPDX-License-Identifier: GPL-3.0-or-later
"""The Mandos wire protocol, version 1, apart from TLS itself.

A client connects over TCP, sends the protocol line ``b"1\\r\\n"`` and then speaks TLS 1.3 in the
*server* role, presenting an RFC 7250 raw public key.  The Mandos server, as TLS client, reads the
peer's DER SubjectPublicKeyInfo, turns it into a key id and sends the client's blob (or nothing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from mandos_protocol.errors import ProtocolError

#: What a client sends before the TLS handshake.
PROTOCOL_LINE = b"1\r\n"

#: Protocol versions a server accepts, as upstream's server does.
ACCEPTED_VERSIONS = frozenset({0, 1})

#: The Zeroconf (DNS-SD) service type a server announces and a client browses for, as
#: upstream's ``mandos`` (through Avahi) and ``mandos-client`` use it.
SERVICE_TYPE = "_mandos._tcp.local."

#: Upstream's default GnuTLS priority for raw public keys (GnuTLS >= 3.6.6), used on both ends,
#: with two changes that cost nothing on the wire and save CPU in every handshake (measured with
#: ``bench/roles.py``: the Mandos server's side from 0.340 to 0.283 ms, the client's from 0.270
#: to 0.223 ms): the same groups, X25519 moved before P-256, so that the key share the TLS client
#: sends is the cheaper curve; and no TLS 1.3 middlebox compatibility mode (a dummy session id
#: and ChangeCipherSpec records that only middleboxes want).  A peer with upstream's string picks
#: X25519 too, or P-256 from our list when it is ours that offers (Debian's mandos-client and
#: mandos both interoperate: tests/test_interop_protocol.py).
DEFAULT_PRIORITY = (
    "SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL:+VERS-TLS1.3:%PROFILE_ULTRA"
    ":-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1:+GROUP-SECP521R1:+GROUP-X448"
    ":+GROUP-FFDHE2048:+GROUP-FFDHE3072:+GROUP-FFDHE4096:+GROUP-FFDHE6144:+GROUP-FFDHE8192"
    ":%DISABLE_TLS13_COMPAT_MODE"
)

#: A protocol line longer than this is garbage; upstream reads one text line, we bound it.
MAX_PROTOCOL_LINE = 64

#: SHA-256 of nothing: upstream never matches a client on this key id, nor do we.
EMPTY_KEY_ID = hashlib.sha256(b"").hexdigest().upper()


def parse_protocol_line(line: bytes) -> int:
    """Return the protocol version of a client's first line, as upstream reads it.

    Upstream takes ``int(line.split()[0])`` and accepts versions 0 and 1; anything else makes it
    close the connection without a word.
    """
    fields = line.split()
    if not fields:
        raise ProtocolError("empty protocol line")
    try:
        version = int(fields[0])
    except ValueError:
        raise ProtocolError(f"unknown protocol version {fields[0][:16]!r}") from None
    if version not in ACCEPTED_VERSIONS:
        raise ProtocolError(f"unknown protocol version {version}")
    return version


def key_id(spki_der: bytes) -> str:
    """The key id of a raw public key: upper-case hex SHA-256 of its DER SubjectPublicKeyInfo.

    This is what upstream's server computes with ``gnutls_pubkey_get_key_id(...SHA256)`` and what
    ``mandos-keygen`` prints as ``key_id``.
    """
    return hashlib.sha256(spki_der).hexdigest().upper()


def normalize_key_id(text: str) -> str:
    """A configured key id or fingerprint as upstream compares it: upper case, spaces removed."""
    return text.upper().replace(" ", "")


def resumable_send(send: Callable[[memoryview], int], data: bytes) -> Callable[[], None]:
    """A non-blocking call sending all of ``data`` with ``send`` (a socket's or a TLS
    session's), keeping its progress across BlockingIOError, for a driver to call again on
    each readiness until it returns."""
    view = memoryview(data)

    def attempt() -> None:
        nonlocal view
        while view:
            view = view[send(view):]

    return attempt
