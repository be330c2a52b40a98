# SPDX-License-Identifier: GPL-3.0-or-later
"""The metrics endpoint (``--metrics``): a small HTTP/1.1 responder on the server's own asyncio
loop, serving ``/metrics`` (Prometheus text, or OpenMetrics when the scraper asks for it) and
``/healthz`` (200 ``ok``, or 503 with a one-line reason).

Why not prometheus-client's own ``start_http_server``: it serves from a thread, and the
collectors read the client table, which only the loop may touch.  Here every request is read and
answered on the loop, so a scrape sees one consistent moment; building the text for a few hundred
clients takes well under a millisecond.

A slow or hostile scraper must never delay an unlock: the request has :data:`READ_DEADLINE`
seconds and :data:`MAX_REQUEST` bytes to arrive, the answer is handed to the transport (which
never blocks the loop) and given :data:`WRITE_DEADLINE` seconds to drain, and at most
:data:`MAX_CONNECTIONS` are open at once (one more is closed at accept).  Each connection
answers one request and is closed (``Connection: close``): scrapers reconnect every interval.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.config import ConfigError
from server.health import Health

READ_DEADLINE = 5.0
WRITE_DEADLINE = 10.0
MAX_REQUEST = 8192
MAX_CONNECTIONS = 16

#: Builds the exposition for an ``Accept`` header: (body, content type).
Exposition = Callable[[str], Awaitable[tuple[bytes, str]]]


#: Where ``--metrics PORT`` (no address) listens: loopback only.
DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """``--metrics``/``metrics =``: ``PORT``, ``:PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` as
    (host, port); without a host, loopback."""
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        host = ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"metrics {text!r}: write an IPv6 address in brackets, "
                          "[ADDRESS]:PORT")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 1 <= number <= 65535:
        raise ConfigError(f"metrics {text!r}: not [ADDRESS:]PORT with a port from 1 to 65535")
    return host or DEFAULT_HOST, number


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    content_type: str
    body: bytes


def _text(status: int, reason: str, body: str) -> Response:
    return Response(status, reason, "text/plain; charset=utf-8", (body + "\n").encode())


class MetricsEndpoint:
    """Listens on (host, port) from :meth:`bind` on, and answers from :meth:`start` until
    :meth:`stop`.  The socket is bound first thing at start-up, so that an address in use
    stops the server before it does anything else; the answers need the running server."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.exposition: Exposition | None = None
        self._socket: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()

    def bind(self, host: str, port: int) -> None:
        try:
            family, kind, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind)
        except (OSError, UnicodeError) as error:
            raise ConfigError(f"metrics: cannot listen on {host} port {port}: "
                              f"{getattr(error, 'strerror', None) or error}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(MAX_CONNECTIONS)
        except OSError as error:
            sock.close()
            raise ConfigError(f"metrics: cannot listen on {host} port {port}: "
                              f"{error.strerror}") from None
        self._socket = sock

    async def start(self, exposition: Exposition) -> None:
        """Answer on the bound socket, with ``exposition`` for /metrics."""
        assert self._socket is not None
        self.exposition = exposition
        self._server = await asyncio.start_server(self._connection, sock=self._socket,
                                                  limit=MAX_REQUEST)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._open)

    @property
    def listening_socket(self) -> socket.socket:
        """The bound listening socket."""
        assert self._socket is not None
        return self._socket

    @property
    def port(self) -> int:
        return int(self.listening_socket.getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            if self._socket is not None:
                self._socket.close()
            return
        self._server.close()
        for task in list(self._open):
            task.cancel()
        await asyncio.gather(*self._open, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._open) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._open.add(task)
        try:
            try:
                async with asyncio.timeout(READ_DEADLINE):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            method, path, accept = _parse(head)
            response = await self._answer(method, path, accept)
            status = f"HTTP/1.1 {response.status} {response.reason}\r\n"
            headers = (f"Content-Type: {response.content_type}\r\n"
                       f"Content-Length: {len(response.body)}\r\n"
                       "Cache-Control: no-store\r\nConnection: close\r\n\r\n")
            writer.write((status + headers).encode("latin-1"))
            if method != "HEAD":
                writer.write(response.body)
            writer.transport.set_write_buffer_limits(high=0)  # drain() waits until all is sent
            async with asyncio.timeout(WRITE_DEADLINE):
                await writer.drain()
            writer.close()  # everything was sent: a clean FIN
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._open.discard(task)
            writer.transport.abort()  # a no-op after close(); else drops what is unsent

    async def _answer(self, method: str, path: str, accept: str) -> Response:
        if not method:
            return _text(400, "Bad Request", "bad request")
        if path not in ("/metrics", "/healthz"):
            return _text(404, "Not Found", "not found: try /metrics or /healthz")
        if method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", "only GET and HEAD")
        if path == "/healthz":
            verdict = self.health.verdict()
            if verdict.healthy:
                return _text(200, "OK", verdict.reason)
            return _text(503, "Service Unavailable", verdict.reason)
        assert self.exposition is not None
        body, content_type = await self.exposition(accept)
        return Response(200, "OK", content_type, body)


def _parse(head: bytes) -> tuple[str, str, str]:
    """(method, path without the query, Accept header); ("", "", "") if it is not HTTP/1.x."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return "", "", ""
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    return parts[0], parts[1].split("?", 1)[0], accept
