# SPDX-License-Identifier: GPL-3.0-or-later
"""The HTTP responder of ``--metrics`` in-process, on loopback: what it answers to each request,
and the bounds that keep a slow or hostile scraper from costing the server (the whole server
under a real Prometheus is tests/test_metrics.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from server import http_endpoint
from server.config import ConfigError
from server.health import Health, directory_writable
from server.http_endpoint import MetricsEndpoint, parse_address


async def _exposition(accept: str) -> tuple[bytes, str]:
    return f"metric 1\n# accept={accept}\n".encode(), "text/plain; version=0.0.4"


async def _request(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read the whole answer (until the endpoint closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def _run(test: Callable[[MetricsEndpoint, Health], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        health = Health()
        endpoint = MetricsEndpoint(health)
        endpoint.bind("127.0.0.1", 0)
        await endpoint.start(_exposition)
        try:
            await test(endpoint, health)
        finally:
            await endpoint.stop()

    asyncio.run(main())


def test_metrics_healthz_and_the_rest() -> None:
    async def test(endpoint: MetricsEndpoint, health: Health) -> None:
        port = endpoint.port
        answer = await _request(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n"
                                      b"Accept: application/openmetrics-text\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b"Connection: close" in head
        assert body == b"metric 1\n# accept=application/openmetrics-text\n"
        head = await _request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert (await _request(port, b"GET /healthz HTTP/1.0\r\n\r\n")).endswith(b"\r\n\r\nok\n")
        remove = health.add(lambda: "etcd: no\nquorum")
        answer = await _request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"\r\n\r\netcd: no quorum\n")
        remove()
        assert b" 200 " in await _request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert b" 404 " in await _request(port, b"GET / HTTP/1.1\r\n\r\n")
        assert b" 405 " in await _request(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert b" 400 " in await _request(port, b"hello\r\n\r\n")

    _run(test)


def test_an_endless_request_is_cut_off() -> None:
    """A request head past MAX_REQUEST bytes gets no answer, only the close."""
    async def test(endpoint: MetricsEndpoint, health: Health) -> None:
        raw = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * http_endpoint.MAX_REQUEST * 2
        assert await _request(endpoint.port, raw) == b""

    _run(test)


def test_silent_connections_past_the_limit_are_closed_at_once() -> None:
    """MAX_CONNECTIONS silent peers hold their slots until READ_DEADLINE; one more is closed
    at accept."""
    async def test(endpoint: MetricsEndpoint, health: Health) -> None:
        held = [await asyncio.open_connection("127.0.0.1", endpoint.port)
                for _ in range(http_endpoint.MAX_CONNECTIONS)]
        while endpoint.connections < http_endpoint.MAX_CONNECTIONS:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        try:
            answer = await reader.read()
        except ConnectionResetError:  # aborted: a reset
            answer = b""
        assert answer == b""
        writer.close()
        for _, held_writer in held:
            held_writer.close()

    _run(test)


@pytest.mark.parametrize(("text", "expected"), [
    ("9120", ("127.0.0.1", 9120)), (":9120", ("127.0.0.1", 9120)),
    ("0.0.0.0:9120", ("0.0.0.0", 9120)), ("[::1]:9120", ("::1", 9120)),
    ("[::]:80", ("::", 80)), ("mandos.example:9120", ("mandos.example", 9120)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "x", "::1:9120", "a:0", "a:65536", "a:b", "[::1]"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics "):
        parse_address(text)


def test_a_missing_directory_is_not_writable(tmp_path: Path) -> None:
    assert directory_writable(tmp_path) is None
    assert directory_writable(tmp_path / "missing") == (
        f"state directory {tmp_path / 'missing'} is not writable")


def test_an_ipv6_address_answers() -> None:
    """``--metrics [::1]:PORT`` listens on IPv6 (the address family comes from the address)."""
    async def main() -> None:
        endpoint = MetricsEndpoint(Health())
        endpoint.bind(parse_address("[::1]:9120")[0], 0)  # any free port
        await endpoint.start(_exposition)
        try:
            reader, writer = await asyncio.open_connection("::1", endpoint.port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (await reader.read()).endswith(b"\r\n\r\nok\n")
            writer.close()
        finally:
            await endpoint.stop()

    asyncio.run(main())


def test_an_address_in_use_is_a_config_error() -> None:
    first, second = MetricsEndpoint(Health()), MetricsEndpoint(Health())
    first.bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=r"Address already in use$"):
            second.bind("127.0.0.1", first.port)
    finally:
        asyncio.run(first.stop())
