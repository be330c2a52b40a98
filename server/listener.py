# SPDX-License-Identifier: GPL-3.0-or-later
"""Listening sockets, and the handling of each connection.

Sockets come from the service manager (``LISTEN_FDS``), from ``--socket FD``, or are bound
here (IPv6 dual-stack unless ``--no-ipv6``; ``SO_BINDTODEVICE`` for ``--interface``).  Each
connection is one asyncio task: read the protocol line with a deadline, run the TLS handshake
as the TLS *client* with empty credentials (non-blocking GnuTLS driven by the loop) with a
deadline, look up the peer's key id, let the client decide, send the blob or nothing, then
close_notify.

A limit that silent peers can fill is a denial of service: a cap of 256 connections in
progress, each held by a silent peer until its deadline, once kept every real client in the
listen backlog for 10 s.  So every connection is accepted at once; a silent or garbage-talking
peer costs one socket and one timer.  What is bounded is the number of open connections (file
descriptors and memory), and when that bound is reached, the *oldest connection still short of
a finished handshake* is evicted to make room: a real client finishes its line and handshake in
milliseconds, so it is never the oldest, while a silent peer ages.  Connections past the
handshake (e.g. waiting for an approval) are never evicted.  Failures before TLS are logged at
DEBUG one by one, and a flood of them as one warning (:class:`FloodReport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from mandos_protocol import tls_asyncio
from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority, Session
from mandos_protocol.wire import (
    MAX_PROTOCOL_LINE,
    PROTOCOL_LINE,
    key_id,
    parse_protocol_line,
    resumable_send,
)
from server import events
from server.clients import ClientTable
from server.config import ConfigError
from server.events import Stage
from server.journal import NOTICE, Event, Journal

#: Deadlines (seconds) for a peer to send its protocol line, to finish the handshake, and to
#: take the blob and answer close_notify.
LINE_DEADLINE = 10.0
HANDSHAKE_DEADLINE = 10.0
SEND_DEADLINE = 10.0
#: The most connections open at once (a few KiB of memory each); past it the oldest one short
#: of a finished handshake is evicted.  Also kept below the file descriptor limit.
MAX_CONNECTIONS = 4096
#: File descriptors kept free for everything else (journal, D-Bus, checkers, state file).
RESERVED_FDS = 64
BACKLOG = max(socket.SOMAXCONN, 1024)
#: Connections taken from one listening socket per turn of the loop.
ACCEPT_BATCH = 64
#: After accept() fails (out of file descriptors), how long a socket is left alone.
ACCEPT_PAUSE = 0.1
#: A flood: this many connections failing before TLS (or evicted) within FLOOD_WINDOW s.
FLOOD_THRESHOLD = 100
FLOOD_WINDOW = 10.0
#: Distinct peers counted per window (a flood from many addresses must not grow memory).
_FLOOD_PEERS_KEPT = 1024


def connection_budget(maximum: int = MAX_CONNECTIONS) -> int:
    """How many connections may be open: ``maximum``, within the file descriptor limit.

    The soft limit is raised to the hard one first, as systemd advises for programs that use
    epoll (systemd's default is 1024:524288), so that a flood of idle peers meets the
    eviction rule above rather than ``EMFILE`` in ``accept``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return maximum
    return max(1, min(maximum, soft - RESERVED_FDS))


class FloodReport:
    """Counts connections that failed before TLS or were evicted, and writes one warning when
    they become a flood (FLOOD_THRESHOLD within FLOOD_WINDOW seconds), then one notice when a
    window passes below the threshold again, with the total: a flood never writes one journal
    entry per connection."""

    def __init__(self, journal: Journal, *, threshold: int = FLOOD_THRESHOLD,
                 window: float = FLOOD_WINDOW) -> None:
        self.journal = journal
        self.threshold = threshold
        self.window = window
        self._count = 0
        self._peers: dict[str, int] = {}
        self._flooding = False
        self._total = 0
        self._started = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, peer: str) -> None:
        self._count += 1
        if peer in self._peers or len(self._peers) < _FLOOD_PEERS_KEPT:  # bounded memory
            self._peers[peer] = self._peers.get(peer, 0) + 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._next_window)
        if not self._flooding and self._count >= self.threshold:
            self._flooding = True
            self._started = time.monotonic()
            self._total = 0
            top, count = max(self._peers.items(), key=lambda item: item[1])
            self.journal.event(
                Event.CONNECTION_FLOOD,
                f"Connection flood: {self._count} connections failed before TLS or were "
                f"evicted within {self.window:g} s (from {len(self._peers)}"
                f"{'+' if len(self._peers) >= _FLOOD_PEERS_KEPT else ''} peers, most from "
                f"{top}: {count}); real clients are still served; further failures are "
                "counted, not logged", peer=top)

    def _next_window(self) -> None:
        self._timer = None
        self._total += self._count
        if self._flooding and self._count < self.threshold:
            self._flooding = False
            self.journal.event(
                Event.CONNECTION_FLOOD,
                f"Connection flood over: {self._total} connections failed before TLS or were "
                f"evicted in {time.monotonic() - self._started:.0f} s", priority=NOTICE)
        self._count = 0
        self._peers = {}
        if self._flooding:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._next_window)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def bind_socket(address: str, port: int, *, use_ipv6: bool = True,
                interface: str = "") -> socket.socket:
    """A listening TCP socket as upstream binds it: IPv6 (dual-stack) unless ``use_ipv6`` is
    false; an IPv4 address with IPv6 is used as ``::ffff:a.b.c.d``."""
    family = socket.AF_INET6 if use_ipv6 else socket.AF_INET
    host = address or ("::" if use_ipv6 else "0.0.0.0")
    try:
        parsed = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise ConfigError(f"address {address!r} is not an IP address") from None
    if use_ipv6 and parsed.version == 4:
        host = f"::ffff:{host}"
    elif not use_ipv6 and parsed.version == 6:
        raise ConfigError(f"address {address!r} is IPv6, but IPv6 is off (--no-ipv6)")
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if use_ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                interface.encode() + b"\0")
            except OSError as error:
                raise ConfigError(
                    f"cannot bind to interface {interface!r}: {error.strerror}") from None
        target: tuple[Any, ...]
        if use_ipv6:
            scope = socket.if_nametoindex(interface) if interface and parsed.is_link_local else 0
            target = (host.split("%")[0], port, 0, scope)
            if "%" in host:
                target = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
        else:
            target = (host, port)
        try:
            sock.bind(target)
        except OSError as error:
            raise ConfigError(f"cannot listen on {address or host} port {port}: "
                              f"{error.strerror}") from None
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt_socket(fd: int) -> socket.socket:
    """``--socket FD``: an inherited socket, made to listen (fds 0-2 are duplicated first, as
    upstream does, so that they can be reopened on /dev/null)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ConfigError(f"--socket {fd}: not a socket: {error.strerror}") from None
    if fd <= 2:
        duplicate = sock.dup()
        sock.detach()
        sock = duplicate
    sock.set_inheritable(False)
    sock.listen(BACKLOG)
    return sock


def format_peer(address: object) -> str:
    """The peer's IP address (an IPv4-mapped IPv6 address as plain IPv4)."""
    if isinstance(address, tuple) and address:
        host = str(address[0])
        with contextlib.suppress(ValueError):
            mapped = ipaddress.ip_address(host.split("%")[0])
            if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
                return str(mapped.ipv4_mapped)
        return host
    return str(address) or "local"


def protocol_line_reader(sock: socket.socket) -> Callable[[], bytes]:
    """A non-blocking call (for :class:`tls_asyncio.Driver`) returning the first line, up to
    and including ``\\n``, never reading past it (the TLS handshake follows) and never more
    than MAX_PROTOCOL_LINE bytes.

    The first read takes ``len(PROTOCOL_LINE)`` bytes: every Mandos client sends exactly
    that, so one ``recv`` usually reads the whole line.  Only a longer or slower line is
    read with ``MSG_PEEK`` first, to stop at the newline.  A line shorter than that is
    followed by nothing (the peer waits for our ClientHello), or else it is garbage.
    """
    line = b""

    def attempt() -> bytes:
        nonlocal line
        while True:
            if not line:
                chunk = sock.recv(len(PROTOCOL_LINE))
                if not chunk:
                    raise ProtocolError("the peer closed the connection before the protocol line")
                end = chunk.find(b"\n")
                if end >= 0:
                    if end + 1 < len(chunk):
                        raise ProtocolError("the peer sent data after its protocol line")
                    return chunk
                line = chunk
                continue
            peeked = sock.recv(MAX_PROTOCOL_LINE - len(line), socket.MSG_PEEK)
            if not peeked:
                raise ProtocolError("the peer closed the connection before the protocol line")
            end = peeked.find(b"\n")
            if end >= 0:
                line += sock.recv(end + 1)
                return line
            line += sock.recv(len(peeked))
            if len(line) >= MAX_PROTOCOL_LINE:
                raise ProtocolError("protocol line too long")

    return attempt


class Listener:
    """Accepts connections on the listening sockets and hands out secrets; publishes each
    refusal and failed connection (the floods and ``accept`` errors go to the journal)."""

    def __init__(self, sockets: list[socket.socket], clients: ClientTable,
                 journal: Journal, publisher: events.Publisher, priority: Priority, *,
                 max_connections: int | None = None) -> None:
        self.sockets = sockets
        self.clients = clients
        self.journal = journal
        self.events = publisher
        self.priority = priority
        self.credentials = Credentials()
        self.max_connections = (connection_budget() if max_connections is None
                                else max_connections)
        self.floods = FloodReport(journal)
        self._accepting: list[socket.socket] = []  # listening sockets being watched
        self._stopping = False
        self._connections: set[asyncio.Task[None]] = set()
        #: Connections short of a finished handshake, oldest first (dicts keep order).
        self._unproven: dict[asyncio.Task[None], None] = {}

    def start(self) -> None:
        for sock in self.sockets:
            sock.setblocking(False)
            self._watch(sock)

    def _watch(self, sock: socket.socket) -> None:
        """Accept from a readiness callback that stays registered: no task to wake and no pair
        of epoll_ctl calls per connection, as ``loop.sock_accept`` costs (issue 15: the
        per-step wake-ups are what a lone client pays above the bare handshake)."""
        if self._stopping:  # a pause after a failed accept() ended after stop()
            return
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, sock)
        self._accepting.append(sock)

    def _unwatch(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self._accepting.remove(sock)

    def _accept_ready(self, sock: socket.socket) -> None:
        """Take the connections waiting on ``sock``, at most :data:`ACCEPT_BATCH` a turn so
        that a flood on one socket cannot starve the loop."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, say: pause this socket a little
                self.journal.event(Event.SERVER_ERROR, f"accept() failed: {error.strerror}")
                self._unwatch(sock)
                loop.call_later(ACCEPT_PAUSE, self._watch, sock)
                return
            connection.setblocking(False)
            if len(self._connections) >= self.max_connections and not self._evict_oldest():
                connection.close()  # every open connection is a client past its handshake
                continue
            task = loop.create_task(self._handle(connection, format_peer(address)))
            self._connections.add(task)
            self._unproven[task] = None
            task.add_done_callback(self._finished)

    def _evict_oldest(self) -> bool:
        """End the oldest connection short of a finished handshake; whether there was one."""
        for task in self._unproven:
            del self._unproven[task]
            self._connections.discard(task)  # its slot is free now; it ends soon
            task.cancel()
            return True
        return False

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def handshakes_in_progress(self) -> int:
        """Connections short of a finished handshake (protocol line or TLS handshake)."""
        return len(self._unproven)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._unproven.pop(task, None)

    async def _handle(self, connection: socket.socket, peer: str) -> None:
        with connection:  # non-blocking already: _accept_ready made it so
            try:
                await self._exchange(connection, peer)
            except asyncio.CancelledError:
                if asyncio.current_task() not in self._connections:  # evicted, not stopping
                    self._failed(peer, Stage.EVICTED, "too many connections open")
                raise

    async def _exchange(self, connection: socket.socket, peer: str) -> None:
        if connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = connection.fileno()
        driver = tls_asyncio.Driver(fd)
        try:
            try:
                parse_protocol_line(
                    await driver.run(protocol_line_reader(connection), LINE_DEADLINE))
            except (ProtocolError, TimeoutError, OSError) as error:
                self._failed(peer, Stage.PROTOCOL_LINE, _reason(error))
                return
            with Session.for_mandos_server(fd, self.credentials, self.priority,
                                           nonblocking=True) as session:
                driver.session = session
                try:
                    await driver.run(session.handshake, HANDSHAKE_DEADLINE)
                    peer_key = key_id(session.peer_public_key())
                except (ProtocolError, TimeoutError, OSError) as error:
                    self._failed(peer, Stage.HANDSHAKE, _reason(error))
                    return
                task = asyncio.current_task()
                if task is not None:
                    self._unproven.pop(task, None)  # proven: never evicted
                await self._serve(session, driver, peer, peer_key)
        finally:
            driver.close()

    async def _serve(self, session: Session, driver: tls_asyncio.Driver, peer: str,
                     peer_key: str) -> None:
        """Decide and send, then close_notify (also after every refusal)."""
        cancelled = False
        try:
            client = self.clients.lookup(peer_key)
            if client is None:
                self.events.publish(events.RequestRefused(
                    peer=peer, key_id=peer_key, client=None, reason=events.Refusal.UNKNOWN_KEY))
                return
            secret = await client.authorize(peer)
            if secret is None:
                return
            await driver.run(resumable_send(session.send, secret), SEND_DEADLINE)
            client.secret_sent(peer)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except (ProtocolError, TimeoutError, OSError) as error:
            self._failed(peer, Stage.SENDING, _reason(error), key=peer_key)
        finally:
            await self._bye(session, driver, quick=cancelled)

    async def _bye(self, session: Session, driver: tls_asyncio.Driver, *, quick: bool) -> None:
        """close_notify, waiting (with a deadline) for the peer's unless we are stopping."""
        with contextlib.suppress(ProtocolError, BlockingIOError, OSError, TimeoutError):
            if quick:
                session.bye(wait_for_peer=False)
                return
            await driver.run(session.bye, SEND_DEADLINE)

    def _failed(self, peer: str, stage: Stage, error: str, *, key: str | None = None) -> None:
        if stage is not Stage.SENDING:  # anyone can do this: no key proven yet
            self.floods.note(peer)
        self.events.publish(events.ConnectionFailed(peer=peer, stage=stage, error=error,
                                                    key_id=key))

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting and end every connection now (requests waiting for approval
        included)."""
        self._stopping = True
        for sock in list(self._accepting):
            self._unwatch(sock)
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.floods.close()
        for sock in self.sockets:
            sock.close()
        self.credentials.close()


def _reason(error: BaseException) -> str:
    """Why a connection failed, in words (a deadline's TimeoutError has none)."""
    return str(error) or "timed out"
