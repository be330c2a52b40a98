# SPDX-License-Identifier: GPL-3.0-or-later
"""The handshake alone: CPU per unlock of each protocol role, with no server around it.

The storm's efficiency target compares our server's CPU per unlock with the load generator's.
The two ends do not do the same work: the Mandos server is the TLS *client*, which makes the
key share and *verifies* the Ed25519 signature of the client's CertificateVerify; the Mandos
client is the TLS *server*, which only signs (about half the cost).  This measures that floor:
two threads run the bare exchange (protocol line, handshake, blob, close_notify) with this
project's GnuTLS binding over connections made beforehand, so neither side pays for accept,
connect, an event loop, a journal or a lookup; each side's CPU is its own thread's CPU time.
A third row adds what every server pays however it is written, one connection at a time:
accept, TCP_NODELAY and close (the floor of a whole server at concurrency 1).

    python -m bench.roles [--unlocks N]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.loadgen import SimulatedClient, make_clients
from mandos_protocol import gnutls, wire
from mandos_protocol.client import exchange_blob

#: Connections made at a time (each holds two descriptors until it is used).
BATCH = 200
#: The row of :func:`_accept_to_close`: the floor of a whole server at concurrency 1.
WHOLE = "loopback TCP, accept to close"


@dataclass(frozen=True)
class RoleTimes:
    """CPU milliseconds per unlock of each role over one transport (medians over runs)."""

    transport: str
    mandos_server_ms: float
    mandos_client_ms: float

    @property
    def ratio(self) -> float:
        return self.mandos_server_ms / self.mandos_client_ms


def _tcp_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` connected loopback TCP pairs (server end, client end), TCP_NODELAY on both."""
    with socket.create_server(("127.0.0.1", 0), backlog=count) as listener:
        pairs = []
        for _ in range(count):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            for end in (server, client):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pairs.append((server, client))
    return pairs


def _unix_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    return [socket.socketpair() for _ in range(count)]


def _serve_one(connection: socket.socket, client: SimulatedClient, priority: gnutls.Priority,
               empty: gnutls.Credentials) -> None:
    """The Mandos server's side of one unlock, blocking: protocol line, handshake, key id,
    the blob, close_notify."""
    wire.parse_protocol_line(connection.recv(len(wire.PROTOCOL_LINE)))
    with gnutls.Session.for_mandos_server(connection.fileno(), empty, priority) as session:
        session.handshake()
        wire.key_id(session.peer_public_key())
        wire.resumable_send(session.send, client.blob)()
        session.bye()


def _exchange(pairs: list[tuple[socket.socket, socket.socket]], client: SimulatedClient,
              priority: gnutls.Priority, empty: gnutls.Credentials) -> tuple[float, float]:
    """One unlock per pair; the CPU seconds of the Mandos server's and the client's thread."""
    cpu: dict[str, float] = {}

    def mandos_server() -> None:
        started = time.thread_time()
        for server_end, _ in pairs:
            _serve_one(server_end, client, priority, empty)
        cpu["server"] = time.thread_time() - started

    def mandos_client() -> None:
        started = time.thread_time()
        for _, client_end in pairs:
            if exchange_blob(client_end, client.credentials, priority) != client.blob:
                raise SystemExit("the blob arrived damaged")
        cpu["client"] = time.thread_time() - started

    threads = [threading.Thread(target=mandos_server), threading.Thread(target=mandos_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for server_end, client_end in pairs:
        server_end.close()
        client_end.close()
    return cpu["server"], cpu["client"]


def _accept_to_close(count: int, client: SimulatedClient, priority: gnutls.Priority,
                     empty: gnutls.Credentials) -> tuple[float, float]:
    """``count`` unlocks over fresh loopback TCP connections, one at a time, with the work that
    every server pays and the bare exchange leaves out: accept, TCP_NODELAY, close (and the
    client's connect and close).  The CPU seconds of each side's thread, as :func:`_exchange`.
    This is the floor of a whole server at concurrency 1: blocking calls in one thread, no
    event loop, no lookup, no journal."""
    cpu: dict[str, float] = {}
    with socket.create_server(("127.0.0.1", 0), backlog=count) as listener:
        address = listener.getsockname()

        def mandos_server() -> None:
            started = time.thread_time()
            for _ in range(count):
                connection, _ = listener.accept()
                with connection:
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    _serve_one(connection, client, priority, empty)
            cpu["server"] = time.thread_time() - started

        def mandos_client() -> None:
            started = time.thread_time()
            for _ in range(count):
                with socket.create_connection(address) as connection:
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if exchange_blob(connection, client.credentials, priority) != client.blob:
                        raise SystemExit("the blob arrived damaged")
            cpu["client"] = time.thread_time() - started

        threads = [threading.Thread(target=mandos_server),
                   threading.Thread(target=mandos_client)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return cpu["server"], cpu["client"]


def measure(unlocks: int = 2000, runs: int = 3) -> list[RoleTimes]:
    """Both roles over Unix socket pairs and over loopback TCP, ``runs`` times each, then
    over loopback TCP with accept and close (:func:`_accept_to_close`)."""
    client = make_clients(1)[0]
    results = []
    transports: list[tuple[str, Callable[[int], list[tuple[socket.socket, socket.socket]]]]] = [
        ("unix socket pair", _unix_pairs), ("loopback TCP", _tcp_pairs)]
    with gnutls.Priority() as priority, gnutls.Credentials() as empty:
        for name, make_pairs in transports:
            server_ms: list[float] = []
            client_ms: list[float] = []
            for _ in range(runs):
                server_cpu = client_cpu = 0.0
                for start in range(0, unlocks, BATCH):
                    pairs = make_pairs(min(BATCH, unlocks - start))
                    server_part, client_part = _exchange(pairs, client, priority, empty)
                    server_cpu += server_part
                    client_cpu += client_part
                server_ms.append(1000 * server_cpu / unlocks)
                client_ms.append(1000 * client_cpu / unlocks)
            results.append(RoleTimes(name, statistics.median(server_ms),
                                     statistics.median(client_ms)))
        whole = [_accept_to_close(unlocks, client, priority, empty) for _ in range(runs)]
        results.append(RoleTimes(WHOLE, 1000 * statistics.median(s for s, _ in whole) / unlocks,
                                 1000 * statistics.median(c for _, c in whole) / unlocks))
    return results


def format_table(results: list[RoleTimes]) -> str:
    lines = ["| handshake, over | Mandos server (TLS client) CPU ms/unlock "
             "| Mandos client (TLS server) CPU ms/unlock | server/client |", "|---|---|---|---|"]
    lines += [f"| {r.transport} | {r.mandos_server_ms:.3f} | {r.mandos_client_ms:.3f} "
              f"| {r.ratio:.2f} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roles",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--unlocks", type=int, default=2000, help="unlocks per run (2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per transport (3)")
    options = parser.parse_args(argv)
    print(format_table(measure(options.unlocks, options.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
