# SPDX-License-Identifier: GPL-3.0-or-later
"""The libgnutls binding, both Mandos roles against each other over a socketpair: blocking (one
thread per side) and non-blocking (both sides in one asyncio loop), deadlines, refusals, the
library checks, and that 10,000 sessions do not leak memory."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import datetime
import functools
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from mandos_protocol import gnutls, tls_asyncio, wire
from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority, Session

TIMEOUT = 5.0


@dataclass(frozen=True)
class KeyPair:
    public_pem: bytes
    private_pem: bytes
    spki_der: bytes


def make_key_pair() -> KeyPair:
    """An Ed25519 pair in the formats upstream's keygen writes (SPKI PEM, PKCS#8 PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key()
    return KeyPair(
        public.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        public.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo),
    )


@pytest.fixture(scope="module")
def key_pair() -> KeyPair:
    return make_key_pair()


@pytest.fixture(scope="module")
def priority() -> Iterator[Priority]:
    with Priority() as compiled:
        yield compiled


@pytest.fixture(scope="module")
def empty_credentials() -> Iterator[Credentials]:
    with Credentials() as credentials:
        yield credentials


@pytest.fixture(scope="module")
def client_credentials(key_pair: KeyPair) -> Iterator[Credentials]:
    with Credentials.raw_public_key(key_pair.public_pem, key_pair.private_pem) as credentials:
        yield credentials


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the Mandos server's end, the Mandos client's end)."""
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        yield server_end, client_end


class Background:
    """Run a function in a thread; ``result()`` re-raises what it raised.  ``hang_up``: a socket
    to shut down when the function is done, so that the other side sees the end at once instead
    of waiting for its deadline."""

    def __init__(self, function: Callable[[], object],
                 hang_up: socket.socket | None = None) -> None:
        self._function = function
        self._hang_up = hang_up
        self._outcome: list[object] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome.append(self._function())
        except BaseException as error:
            self._error.append(error)
        finally:
            if self._hang_up is not None:
                with contextlib.suppress(OSError):
                    self._hang_up.shutdown(socket.SHUT_RDWR)

    def result(self, timeout: float = 2 * TIMEOUT) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the peer thread hangs"
        if self._error:
            raise self._error[0]
        return self._outcome[0]


def serve_blob(fd: int, credentials: Credentials, priority: Priority, blob: bytes) -> bytes:
    """The Mandos server's part: handshake, read the key, send, close; returns the peer DER."""
    with Session.for_mandos_server(fd, credentials, priority, timeout=TIMEOUT) as session:
        session.handshake()
        der = session.peer_public_key()
        wire.resumable_send(session.send, blob)()
        session.bye()
        return der


def fetch_blob(fd: int, credentials: Credentials, priority: Priority,
               limit: int = 1 << 20) -> bytes:
    """The Mandos client's part: handshake, read until close_notify, answer it."""
    with Session.for_mandos_client(fd, credentials, priority, timeout=TIMEOUT) as session:
        session.handshake()
        blob = session.recv_all(limit)
        session.bye()
        return blob


@pytest.mark.parametrize("size", [0, 1, 1000, 16384, 100_000])
def test_blocking_roles_exchange_a_blob(
    size: int, key_pair: KeyPair, priority: Priority, empty_credentials: Credentials,
    client_credentials: Credentials, socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    blob = os.urandom(size)
    server_end, client_end = socket_pair
    client = Background(lambda: fetch_blob(client_end.fileno(), client_credentials, priority))
    der = serve_blob(server_end.fileno(), empty_credentials, priority, blob)
    assert client.result() == blob
    assert der == key_pair.spki_der
    assert wire.key_id(der) == wire.key_id(key_pair.spki_der)


def test_credentials_from_files(tmp_private: Path, key_pair: KeyPair, priority: Priority,
                                empty_credentials: Credentials,
                                socket_pair: tuple[socket.socket, socket.socket]) -> None:
    public, private = tmp_private / "tls-pubkey.pem", tmp_private / "tls-privkey.pem"
    public.write_bytes(key_pair.public_pem)
    private.write_bytes(key_pair.private_pem)
    server_end, client_end = socket_pair
    with Credentials.raw_public_key_files(public, private) as credentials:
        client = Background(lambda: fetch_blob(client_end.fileno(), credentials, priority))
        der = serve_blob(server_end.fileno(), empty_credentials, priority, b"blob")
        assert client.result() == b"blob"
    assert der == key_pair.spki_der


def test_missing_key_file_is_a_protocol_error(tmp_private: Path) -> None:
    with pytest.raises(ProtocolError, match="cannot read TLS key file"):
        Credentials.raw_public_key_files(tmp_private / "nope.pem", tmp_private / "nope2.pem")


def test_garbage_key_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="raw public key pair"):
        Credentials.raw_public_key(b"not a key", b"not a key either")


def test_invalid_priority_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="priority"):
        Priority("NORMAL:+NO-SUCH-THING")


def test_recv_all_enforces_its_limit(
    priority: Priority, empty_credentials: Credentials, client_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    server_end, client_end = socket_pair
    client = Background(
        lambda: fetch_blob(client_end.fileno(), client_credentials, priority, limit=100),
        hang_up=client_end,
    )
    with contextlib.suppress(ProtocolError):  # the client may hang up before our close_notify
        serve_blob(server_end.fileno(), empty_credentials, priority, b"x" * 101)
    with pytest.raises(ProtocolError, match="more than 100 bytes"):
        client.result()


def test_nonblocking_roles_in_one_event_loop(
    key_pair: KeyPair, priority: Priority, empty_credentials: Credentials,
    client_credentials: Credentials, socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    blob = os.urandom(50_000)
    server_end, client_end = socket_pair
    server_end.setblocking(False)
    client_end.setblocking(False)

    async def server_side() -> bytes:
        fd = server_end.fileno()
        with Session.for_mandos_server(fd, empty_credentials, priority,
                                       nonblocking=True) as session:
            driver = tls_asyncio.Driver(fd, session)
            try:
                await driver.run(session.handshake)
                der = session.peer_public_key()
                offset = 0
                while offset < len(blob):
                    offset += await driver.run(
                        functools.partial(session.send, memoryview(blob)[offset:]))
                await driver.run(session.bye)
            finally:
                driver.close()
            return der

    async def client_side() -> bytes:
        fd = client_end.fileno()
        with Session.for_mandos_client(fd, client_credentials, priority,
                                       nonblocking=True) as session:
            driver = tls_asyncio.Driver(fd, session)
            try:
                await driver.run(session.handshake)
                chunks = []
                while chunk := await driver.run(session.recv):
                    chunks.append(chunk)
                await driver.run(session.bye)
            finally:
                driver.close()
            return b"".join(chunks)

    async def both() -> tuple[bytes, bytes]:
        async with asyncio.timeout(TIMEOUT):
            return await asyncio.gather(server_side(), client_side())

    der, received = asyncio.run(both())
    assert der == key_pair.spki_der
    assert received == blob


def test_nonblocking_call_raises_blocking_io_error(
    priority: Priority, empty_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    server_end, _ = socket_pair
    server_end.setblocking(False)
    with Session.for_mandos_server(server_end.fileno(), empty_credentials, priority,
                                   nonblocking=True) as session:
        with pytest.raises(BlockingIOError):
            session.handshake()  # sent the ClientHello, waits for an answer
        assert session.want_write is False


@pytest.mark.timeout(60)  # without a deadline the handshake would wait for ever
@pytest.mark.parametrize("role", ["server", "client"])
def test_silent_peer_times_out(
    role: str, priority: Priority, empty_credentials: Credentials,
    client_credentials: Credentials, socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    own_end, _silent = socket_pair
    if role == "server":
        session = Session.for_mandos_server(own_end.fileno(), empty_credentials, priority,
                                            timeout=0.5)
    else:
        session = Session.for_mandos_client(own_end.fileno(), client_credentials, priority,
                                            timeout=0.5)
    started = time.monotonic()
    with session, pytest.raises(ProtocolError, match="timed out"):
        session.handshake()  # returns only because the deadline passed: the peer is silent
    # Not before the deadline (a unit mix-up, e.g. seconds taken for milliseconds, would end
    # it at once); load can only lengthen the wait, so no upper bound.
    assert time.monotonic() - started > 0.4


def test_peer_hanging_up_is_a_protocol_error(
    priority: Priority, empty_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    server_end, client_end = socket_pair
    client_end.close()
    with Session.for_mandos_server(server_end.fileno(), empty_credentials, priority,
                                   timeout=TIMEOUT) as session, pytest.raises(ProtocolError):
        session.handshake()


def test_garbage_peer_is_a_protocol_error(
    priority: Priority, client_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    server_end, client_end = socket_pair
    server_end.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
    with Session.for_mandos_client(client_end.fileno(), client_credentials, priority,
                                   timeout=TIMEOUT) as session, pytest.raises(ProtocolError):
        session.handshake()


def test_client_without_a_key_cannot_handshake(
    priority: Priority, empty_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A Mandos client with no raw public key: neither end gets anywhere, both with
    ProtocolError (never a hang, never success)."""
    server_end, client_end = socket_pair

    def keyless_client() -> None:
        with Session.for_mandos_client(client_end.fileno(), empty_credentials, priority,
                                       timeout=TIMEOUT) as session:
            session.handshake()

    client = Background(keyless_client, hang_up=client_end)
    with pytest.raises(ProtocolError):
        serve_blob(server_end.fileno(), empty_credentials, priority, b"never sent")
    with pytest.raises(ProtocolError):
        client.result()


def _x509_context(tmp_private: Path) -> ssl.SSLContext:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x509-only")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    cert_path, key_path = tmp_private / "cert.pem", tmp_private / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_path, key_path)
    return context


def test_peer_with_an_x509_certificate_is_refused(
    tmp_private: Path, priority: Priority, empty_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """OpenSSL (Python's ssl) can only present X.509: the Mandos server must not accept it as a
    client identity."""
    server_end, client_end = socket_pair
    context = _x509_context(tmp_private)

    def x509_peer() -> None:
        with contextlib.suppress(OSError), context.wrap_socket(client_end,
                                                                server_side=True) as tls:
            tls.recv(1)

    peer = Background(x509_peer)
    with Session.for_mandos_server(server_end.fileno(), empty_credentials, priority,
                                   timeout=TIMEOUT) as session, pytest.raises(ProtocolError):
        session.handshake()
        session.peer_public_key()
    server_end.shutdown(socket.SHUT_RDWR)
    peer.result()


def test_peer_public_key_before_handshake_is_a_protocol_error(
    priority: Priority, empty_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    with Session.for_mandos_server(socket_pair[0].fileno(), empty_credentials,
                                   priority) as session, \
            pytest.raises(ProtocolError, match="no raw public key"):
        session.peer_public_key()


def test_use_after_close_is_a_protocol_error(
    priority: Priority, empty_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    session = Session.for_mandos_server(socket_pair[0].fileno(), empty_credentials, priority)
    session.close()
    session.close()  # idempotent
    with pytest.raises(ProtocolError, match="after close"):
        session.handshake()


def test_missing_library_is_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gnutls, "SONAME", "libgnutls-missing.so.99")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libgnutls-missing.so.98")
    with pytest.raises(ProtocolError, match="libgnutls is not installed"):
        gnutls._Library()


def test_old_library_is_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gnutls, "MINIMUM_VERSION", "99.0.0")
    with pytest.raises(ProtocolError, match="too old"):
        gnutls._Library()


def test_library_version_is_new_enough() -> None:
    version = tuple(int(part) for part in gnutls.library().version.split(".")[:3])
    assert version >= (3, 6, 6)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_ten_thousand_sessions_do_not_leak(
    priority: Priority, empty_credentials: Credentials, client_credentials: Credentials,
) -> None:
    """Full handshakes with a blob each way round; RSS after a warm-up must stay flat.

    One peer thread serves all sessions (a thread per session would measure the allocator's
    thread arenas, not us)."""

    def sessions(count: int) -> None:
        requests: list[socket.socket] = []
        ready = threading.Semaphore(0)

        def clients() -> None:
            for _ in range(count):
                ready.acquire()
                end = requests.pop()
                with end:
                    assert fetch_blob(end.fileno(), client_credentials, priority) == b"blob"

        peer = Background(clients)
        for _ in range(count):
            server_end, client_end = socket.socketpair()
            with server_end:
                requests.append(client_end)
                ready.release()
                serve_blob(server_end.fileno(), empty_credentials, priority, b"blob")
        peer.result(timeout=120)

    sessions(1000)  # warm-up: allocator pools, lazy GnuTLS state
    before = _rss_kib()
    sessions(10_000)
    growth = _rss_kib() - before
    assert growth < 10 * 1024, f"RSS grew by {growth} KiB over 10,000 sessions"


def test_session_with_closed_priority_is_a_protocol_error(
    empty_credentials: Credentials, socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A failed set-up frees the half-made session and says why (no AttributeError)."""
    closed = Priority()
    closed.close()
    with pytest.raises(ProtocolError, match="priority used after close"):
        Session.for_mandos_server(socket_pair[0].fileno(), empty_credentials, closed)


def test_blocking_handshake_survives_a_signal(
    priority: Priority, empty_credentials: Credentials, client_credentials: Credentials,
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A signal arriving while a blocking session waits for its peer is not an error: the
    call goes on (GnuTLS reports GNUTLS_E_INTERRUPTED; only non-blocking sessions surface it)."""
    server_end, client_end = socket_pair
    blob = b"after the signal"

    def late_server() -> bytes:
        time.sleep(0.5)
        return serve_blob(server_end.fileno(), empty_credentials, priority, blob)

    signals = []
    previous = signal.signal(signal.SIGALRM, lambda number, frame: signals.append(number))
    try:
        server = Background(late_server)
        signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
        try:
            # No deadline: GnuTLS then reads with plain recv(), which a signal interrupts.
            with Session.for_mandos_client(client_end.fileno(), client_credentials,
                                           priority) as session:
                session.handshake()
                fetched = session.recv_all(1 << 20)
                session.bye()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        server.result()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert signals, "no signal arrived during the handshake"
    assert fetched == blob
