# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos_protocol against Debian's real upstream Mandos 1.8 programs, in both roles:

* our Mandos-server role hands a keygen-made blob to the real ``mandos-client``, which decrypts
  it and prints the password;
* our Mandos-client role fetches the blob from the real ``mandos`` server, byte for byte, and an
  unknown key gets upstream's refusal: a good handshake and then nothing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mandos_protocol import wire
from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority, Session
from peers import upstream
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop

TIMEOUT = 10.0
BLOB_LIMIT = 1 << 20


@dataclass
class LibraryServer:
    """A minimal Mandos server made of the library alone: protocol line, TLS as client, key id,
    then ``blobs[key_id]`` (or nothing) and close_notify.  Records each peer's key id."""

    blobs: dict[str, bytes]
    family: socket.AddressFamily = socket.AF_INET
    seen: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        host = "::1" if self.family == socket.AF_INET6 else "127.0.0.1"
        self.listener = socket.socket(self.family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.connect = f"{host}:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with Priority() as priority, Credentials() as credentials:
            while not self._stop.is_set():
                try:
                    connection, _ = self.listener.accept()
                except TimeoutError:
                    continue
                with connection:
                    try:
                        self._handle(connection, priority, credentials)
                    except (ProtocolError, OSError) as error:
                        self.errors.append(error)

    def _handle(self, connection: socket.socket, priority: Priority,
                credentials: Credentials) -> None:
        connection.settimeout(TIMEOUT)
        line = connection.makefile("rb").readline(wire.MAX_PROTOCOL_LINE)
        wire.parse_protocol_line(line)
        with Session.for_mandos_server(connection.fileno(), credentials, priority,
                                       timeout=TIMEOUT) as session:
            session.handshake()
            key_id = wire.key_id(session.peer_public_key())
            self.seen.append(key_id)
            blob = self.blobs.get(key_id)
            if blob:
                wire.resumable_send(session.send, blob)()
            session.bye()

    def __enter__(self) -> LibraryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_upstream_client_gets_password_from_library_server(
    family: socket.AddressFamily, upstream_client: UpstreamClient,
) -> None:
    keys = upstream_client.keys
    with LibraryServer({keys.key_id: upstream_client.secret}, family) as server:
        result = upstream.run_upstream_client(keys, server.connect, TIMEOUT)
    assert result.returncode == 0, (result.stderr, server.errors)
    assert result.stdout == upstream_client.password
    assert server.seen[0] == keys.key_id
    assert not server.errors


def test_upstream_client_retries_after_refusal(upstream_client: UpstreamClient) -> None:
    """An empty answer is a refusal: upstream's client keeps trying and never prints."""
    keys = upstream_client.keys
    with LibraryServer({}) as server:
        result = upstream.run_upstream_client(keys, server.connect, 2.5,
                                              extra_args=["--retry=0.5"])
    assert result.returncode == 124  # killed by timeout(1)
    assert result.stdout == b""
    assert len(server.seen) >= 2 and set(server.seen) == {keys.key_id}


def fetch(connect: tuple[str, int], credentials: Credentials) -> bytes:
    """Our Mandos-client role, blocking: protocol line, TLS as server, read to close_notify."""
    with socket.create_connection(connect, timeout=TIMEOUT) as connection, \
            Priority() as priority:
        connection.sendall(wire.PROTOCOL_LINE)
        with Session.for_mandos_client(connection.fileno(), credentials, priority,
                                       timeout=TIMEOUT) as session:
            session.handshake()
            blob = session.recv_all(BLOB_LIMIT)
            with contextlib.suppress(ProtocolError):  # the server may close first
                session.bye()
            return blob


@pytest.fixture
def upstream_server(upstream_client: UpstreamClient) -> Iterator[upstream.UpstreamServer]:
    with upstream.UpstreamServer(upstream_client.section) as server:
        yield server


def test_library_client_fetches_identical_blob_from_upstream_server(
    upstream_client: UpstreamClient, upstream_server: upstream.UpstreamServer,
) -> None:
    keys = upstream_client.keys
    address = (upstream_server.address or "127.0.0.1", upstream_server.port)
    with Credentials.raw_public_key_files(keys.tls_pubkey, keys.tls_privkey) as credentials:
        for _ in range(3):  # the same blob every time, not only once
            assert fetch(address, credentials) == upstream_client.secret


def test_upstream_server_refuses_unknown_key_with_nothing(
    upstream_server: upstream.UpstreamServer,
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    address = (upstream_server.address or "127.0.0.1", upstream_server.port)
    with Credentials.raw_public_key(public, private) as credentials:
        assert fetch(address, credentials) == b""
