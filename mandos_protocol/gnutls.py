# SPDX-License-Identifier: GPL-3.0-or-later
"""TLS 1.3 with RFC 7250 raw public keys, through libgnutls and ctypes, for both Mandos roles.

Python's ``ssl`` module cannot negotiate raw public keys (OpenSSL 3.0 has no RFC 7250, and CPython
exposes no certificate-type negotiation), so this module binds the same library that upstream's
server binds.  The roles are inverted, as upstream does it:

* the Mandos **client** is the TLS *server*: it presents its raw public key
  (:meth:`Session.for_mandos_client`);
* the Mandos **server** is the TLS *client*, holds no credentials at all, and reads the peer's DER
  SubjectPublicKeyInfo after the handshake (:meth:`Session.for_mandos_server`).

A session works on a connected socket's file descriptor, blocking (with deadlines) or non-blocking.
Non-blocking calls raise :class:`BlockingIOError` with ``want_write`` telling which readiness to
wait for, so that an event loop can drive them (see :mod:`mandos_protocol.tls_asyncio`).

Every GnuTLS object allocated here is freed by ``close()`` (sessions, credentials, priorities);
the classes are context managers.  Objects that can be shared (credentials, the compiled
priority) are made once and reused for every connection.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
from typing import Any, Self

from mandos_protocol.errors import ProtocolError
from mandos_protocol.wire import DEFAULT_PRIORITY

# Constants from <gnutls/gnutls.h> (3.7).
_GNUTLS_SERVER = 1
_GNUTLS_CLIENT = 1 << 1
_GNUTLS_NONBLOCK = 1 << 3
_GNUTLS_NO_TICKETS = 1 << 10
_GNUTLS_KEY_SHARE_TOP = 1 << 11
_GNUTLS_ENABLE_RAWPK = 1 << 18
_GNUTLS_CRD_CERTIFICATE = 1
_GNUTLS_X509_FMT_PEM = 1
_GNUTLS_CRT_RAWPK = 3
_GNUTLS_CTYPE_PEERS = 3
_GNUTLS_SHUT_RDWR = 0
_GNUTLS_SHUT_WR = 1
_GNUTLS_PKCS_PLAIN = 1
_E_AGAIN = -28
_E_INTERRUPTED = -52
_E_PREMATURE_TERMINATION = -110
_E_TIMEDOUT = -319

#: The library as Debian's libgnutls30 installs it.
SONAME = "libgnutls.so.30"
#: Oldest libgnutls with raw public keys (RFC 7250).
MINIMUM_VERSION = "3.6.6"


class _Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(ctypes.c_ubyte)), ("size", ctypes.c_uint)]


def _datum(data: bytes) -> tuple[_Datum, Any]:
    """A gnutls_datum_t pointing at a copy of ``data``; keep the buffer alive while in use."""
    buffer = ctypes.create_string_buffer(data, len(data))
    return _Datum(ctypes.cast(buffer, ctypes.POINTER(ctypes.c_ubyte)), len(data)), buffer


def _load(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


class _Library:
    """The loaded libgnutls with the prototypes this module uses."""

    def __init__(self) -> None:
        lib = _load(SONAME)
        if lib is None:
            # find_library runs ldconfig (and gcc): slow, and absent in an initramfs, so it is
            # only the fallback for a library under another soname, and so is its import
            # (shutil, subprocess, tempfile: ~5 ms).
            from ctypes.util import find_library

            found = find_library("gnutls")
            lib = _load(found) if found else None
        if lib is None:
            raise ProtocolError(
                "libgnutls is not installed (Debian package libgnutls30); it is needed for TLS "
                "with raw public keys"
            )
        lib.gnutls_check_version.restype = ctypes.c_char_p
        lib.gnutls_check_version.argtypes = [ctypes.c_char_p]
        if lib.gnutls_check_version(MINIMUM_VERSION.encode()) is None:
            found = (lib.gnutls_check_version(None) or b"unknown").decode()
            raise ProtocolError(
                f"libgnutls {found} is too old: raw public keys need {MINIMUM_VERSION} or newer"
            )
        self.version: str = lib.gnutls_check_version(None).decode()
        p, i, u, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
        prototypes: dict[str, tuple[Any, list[Any]]] = {
            "gnutls_strerror": (ctypes.c_char_p, [i]),
            "gnutls_error_is_fatal": (i, [i]),
            "gnutls_certificate_allocate_credentials": (i, [ctypes.POINTER(p)]),
            "gnutls_certificate_free_credentials": (None, [p]),
            "gnutls_certificate_set_rawpk_key_mem": (
                i, [p, ctypes.POINTER(_Datum), ctypes.POINTER(_Datum), i, ctypes.c_char_p, u,
                    p, u, u]),
            "gnutls_priority_init": (i, [ctypes.POINTER(p), ctypes.c_char_p,
                                         ctypes.POINTER(ctypes.c_char_p)]),
            "gnutls_priority_deinit": (None, [p]),
            "gnutls_init": (i, [ctypes.POINTER(p), u]),
            "gnutls_deinit": (None, [p]),
            "gnutls_priority_set": (i, [p, p]),
            "gnutls_credentials_set": (i, [p, i, p]),
            "gnutls_transport_set_int2": (None, [p, i, i]),
            "gnutls_handshake_set_timeout": (None, [p, u]),
            "gnutls_record_set_timeout": (None, [p, u]),
            "gnutls_handshake": (i, [p]),
            "gnutls_record_get_direction": (i, [p]),
            "gnutls_certificate_type_get2": (i, [p, i]),
            "gnutls_certificate_get_peers": (ctypes.POINTER(_Datum), [p, ctypes.POINTER(u)]),
            "gnutls_record_send": (ctypes.c_ssize_t, [p, ctypes.c_void_p, s]),
            "gnutls_record_recv": (ctypes.c_ssize_t, [p, ctypes.c_void_p, s]),
            "gnutls_bye": (i, [p, i]),
        }
        for fname, (restype, argtypes) in prototypes.items():
            function = getattr(lib, fname)
            function.restype = restype
            function.argtypes = argtypes
        self.lib = lib

    def error(self, code: int, doing: str) -> ProtocolError:
        message = (self.lib.gnutls_strerror(code) or b"unknown error").decode()
        return ProtocolError(f"TLS {doing} failed: {message}")


@functools.cache
def library() -> _Library:
    """Load libgnutls once; raises :class:`ProtocolError` if missing or older than 3.6.6."""
    return _Library()


class _Allocated:
    """A GnuTLS object this module allocated: ``handle`` while open, freed by ``close()`` (also
    on garbage collection); a context manager."""

    _what = "GnuTLS object"

    def __init__(self) -> None:
        self._handle = ctypes.c_void_p()

    def _free(self, handle: ctypes.c_void_p) -> None:
        raise NotImplementedError

    @property
    def handle(self) -> ctypes.c_void_p:
        if not self._handle:
            raise ProtocolError(f"{self._what} used after close()")
        return self._handle

    def close(self) -> None:
        if self._handle:
            self._free(self._handle)
            self._handle = ctypes.c_void_p()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Priority(_Allocated):
    """A compiled GnuTLS priority string, made once and shared by every session."""

    _what = "priority"

    def __init__(self, text: str = DEFAULT_PRIORITY) -> None:
        super().__init__()
        gnutls = library()
        error_position = ctypes.c_char_p()
        code = gnutls.lib.gnutls_priority_init(
            ctypes.byref(self._handle), text.encode(), ctypes.byref(error_position)
        )
        if code < 0:
            where = (error_position.value or b"").decode(errors="replace")
            raise ProtocolError(f"invalid GnuTLS priority string {text!r} at {where!r}")
        self.text = text

    def _free(self, handle: ctypes.c_void_p) -> None:
        library().lib.gnutls_priority_deinit(handle)


class Credentials(_Allocated):
    """GnuTLS certificate credentials: empty for the Mandos server, a raw public key pair for the
    Mandos client."""

    _what = "credentials"

    def __init__(self) -> None:
        super().__init__()
        code = library().lib.gnutls_certificate_allocate_credentials(ctypes.byref(self._handle))
        if code < 0:
            raise library().error(code, "credential allocation")

    @classmethod
    def raw_public_key(cls, public_pem: bytes, private_pem: bytes) -> Credentials:
        """Credentials presenting a raw public key, from PEM SubjectPublicKeyInfo and PEM
        (PKCS#8 or traditional) private key bytes, as upstream's keygen writes them."""
        credentials = cls()
        spki, spki_buffer = _datum(public_pem)
        key, key_buffer = _datum(private_pem)
        try:
            code = library().lib.gnutls_certificate_set_rawpk_key_mem(
                credentials.handle, ctypes.byref(spki), ctypes.byref(key), _GNUTLS_X509_FMT_PEM,
                None, 0, None, 0, _GNUTLS_PKCS_PLAIN,
            )
        finally:
            ctypes.memset(key_buffer, 0, len(private_pem))
            del spki_buffer, key_buffer
        if code < 0:
            credentials.close()
            raise library().error(code, "loading the raw public key pair")
        return credentials

    @classmethod
    def raw_public_key_files(cls, public_path: str | os.PathLike[str],
                             private_path: str | os.PathLike[str]) -> Credentials:
        """Like :meth:`raw_public_key`, reading ``tls-pubkey.pem`` and ``tls-privkey.pem``."""
        try:
            with open(public_path, "rb") as public, open(private_path, "rb") as private:
                public_pem = public.read()
                private_pem = bytearray(private.read())
        except OSError as error:
            raise ProtocolError(
                f"cannot read TLS key file {error.filename}: {error.strerror}"
            ) from None
        try:
            return cls.raw_public_key(public_pem, bytes(private_pem))
        finally:
            private_pem[:] = bytes(len(private_pem))

    def _free(self, handle: ctypes.c_void_p) -> None:
        library().lib.gnutls_certificate_free_credentials(handle)


class Role(enum.Enum):
    """Which end of the Mandos protocol a session serves."""

    MANDOS_SERVER = "mandos-server"  # TLS client, no credentials, reads the peer's public key
    MANDOS_CLIENT = "mandos-client"  # TLS server, presents a raw public key


class Session(_Allocated):
    """One TLS session on a connected socket.

    ``timeout`` (seconds) bounds the handshake and each record read of a blocking session; a
    non-blocking session (``nonblocking=True``, on a non-blocking socket) raises
    :class:`BlockingIOError` instead of waiting, and its driver enforces deadlines.

    The session holds references to its credentials and priority, which must stay open while it
    is in use; it does not own the socket.
    """

    _RECV_CHUNK = 16384
    _what = "TLS session"

    def __init__(self, fd: int, role: Role, credentials: Credentials, priority: Priority, *,
                 nonblocking: bool = False, timeout: float | None = None) -> None:
        super().__init__()
        self._buffer: Any = None
        self._gnutls = library()
        lib = self._gnutls.lib
        flags = _GNUTLS_ENABLE_RAWPK | _GNUTLS_NO_TICKETS
        if role is Role.MANDOS_SERVER:
            # One key share (the priority's first group) instead of GnuTLS's default two: every
            # Mandos client accepts that group, and each share costs a key generation.
            flags |= _GNUTLS_CLIENT | _GNUTLS_KEY_SHARE_TOP
        else:
            flags |= _GNUTLS_SERVER
        if nonblocking:
            flags |= _GNUTLS_NONBLOCK
        self._nonblocking = nonblocking
        self.role = role
        self._credentials = credentials
        self._priority = priority
        code = lib.gnutls_init(ctypes.byref(self._handle), flags)
        if code < 0:
            raise self._gnutls.error(code, "session set-up")
        try:
            self._call("priority set-up", lib.gnutls_priority_set, priority.handle)
            self._call("credential set-up", lib.gnutls_credentials_set,
                       _GNUTLS_CRD_CERTIFICATE, credentials.handle)
        except ProtocolError:
            self.close()
            raise
        lib.gnutls_transport_set_int2(self._handle, fd, fd)
        if timeout is not None:
            milliseconds = max(1, int(timeout * 1000))
            lib.gnutls_handshake_set_timeout(self._handle, milliseconds)
            lib.gnutls_record_set_timeout(self._handle, milliseconds)

    @classmethod
    def for_mandos_server(cls, fd: int, credentials: Credentials, priority: Priority,
                          **options: Any) -> Session:
        """The Mandos server's side: TLS client; ``credentials`` are empty ones."""
        return cls(fd, Role.MANDOS_SERVER, credentials, priority, **options)

    @classmethod
    def for_mandos_client(cls, fd: int, credentials: Credentials, priority: Priority,
                          **options: Any) -> Session:
        """The Mandos client's side: TLS server presenting the raw public key in
        ``credentials``."""
        return cls(fd, Role.MANDOS_CLIENT, credentials, priority, **options)

    @property
    def want_write(self) -> bool:
        """After a :class:`BlockingIOError`: whether GnuTLS waits to write (else to read)."""
        return bool(self._gnutls.lib.gnutls_record_get_direction(self.handle))

    def _call(self, doing: str, function: Any, *args: Any) -> int:
        """Call a GnuTLS function on this session and map its errors.

        A blocking session retries a call a signal interrupted; a non-blocking one raises
        :class:`BlockingIOError` for its driver to wait and call again.
        """
        while True:
            code: int = function(self.handle, *args)
            if code >= 0:
                return code
            if code == _E_INTERRUPTED and not self._nonblocking:
                continue
            if code in (_E_AGAIN, _E_INTERRUPTED):
                raise BlockingIOError(f"TLS {doing} would block")
            if code == _E_TIMEDOUT:
                raise ProtocolError(f"TLS {doing} timed out")
            if code == _E_PREMATURE_TERMINATION:
                raise ProtocolError(f"TLS {doing} failed: the peer closed the connection")
            raise self._gnutls.error(code, doing)

    def handshake(self) -> None:
        """Run (or continue) the handshake."""
        self._call("handshake", self._gnutls.lib.gnutls_handshake)

    def peer_public_key(self) -> bytes:
        """The peer's DER SubjectPublicKeyInfo; :class:`ProtocolError` if it sent no raw public
        key (for example an X.509 certificate, or nothing)."""
        lib = self._gnutls.lib
        if lib.gnutls_certificate_type_get2(self.handle, _GNUTLS_CTYPE_PEERS) != _GNUTLS_CRT_RAWPK:
            raise ProtocolError("the peer presented no raw public key")
        count = ctypes.c_uint(0)
        peers = lib.gnutls_certificate_get_peers(self.handle, ctypes.byref(count))
        if not peers or count.value < 1 or peers[0].size == 0:
            raise ProtocolError("the peer presented no raw public key")
        return ctypes.string_at(peers[0].data, peers[0].size)

    def send(self, data: bytes | memoryview) -> int:
        """Send some of ``data`` as application data; returns how many bytes were taken."""
        view = memoryview(data)
        if not view:
            return 0
        buffer = (ctypes.c_char * len(view)).from_buffer_copy(view)
        return self._call("send", self._gnutls.lib.gnutls_record_send, buffer, len(view))

    def recv(self, size: int = _RECV_CHUNK) -> bytes:
        """Receive up to ``size`` bytes; ``b""`` means the peer sent close_notify."""
        if self._buffer is None or len(self._buffer) < size:
            self._buffer = ctypes.create_string_buffer(size)
        received = self._call("receive", self._gnutls.lib.gnutls_record_recv, self._buffer, size)
        return self._buffer.raw[:received]

    def recv_all(self, limit: int) -> bytes:
        """Receive until close_notify (blocking sessions); more than ``limit`` bytes is an
        error."""
        chunks: list[bytes] = []
        total = 0
        while chunk := self.recv():
            total += len(chunk)
            if total > limit:
                raise ProtocolError(f"the peer sent more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def bye(self, *, wait_for_peer: bool = True) -> None:
        """Send close_notify; with ``wait_for_peer``, also wait for the peer's."""
        how = _GNUTLS_SHUT_RDWR if wait_for_peer else _GNUTLS_SHUT_WR
        self._call("shutdown", self._gnutls.lib.gnutls_bye, how)

    def _free(self, handle: ctypes.c_void_p) -> None:
        library().lib.gnutls_deinit(handle)

    def close(self) -> None:
        """Free the session (not the socket) and zero its receive buffer."""
        super().close()
        if self._buffer is not None:
            ctypes.memset(self._buffer, 0, len(self._buffer))
            self._buffer = None
