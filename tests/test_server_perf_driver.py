# SPDX-License-Identifier: GPL-3.0-or-later
"""The per-connection I/O of the listener made cheaper (one fd registration per connection, the
protocol line in one ``recv``) must not change what a peer sees or what it costs."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mandos_protocol import tls_asyncio
from mandos_protocol.errors import ProtocolError
from server.listener import protocol_line_reader


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


def test_protocol_line_read_whole_slowly_and_never_past_the_newline() -> None:
    async def scenario() -> None:
        ours, theirs = _pair()
        with ours, theirs:
            driver = tls_asyncio.Driver(ours.fileno())
            theirs.sendall(b"1\r\n")
            assert await driver.run(protocol_line_reader(ours), 1) == b"1\r\n"
            # A long line, byte by byte, followed by TLS bytes that must stay unread.
            reading = asyncio.ensure_future(driver.run(protocol_line_reader(ours), 1))
            for byte in b"1 extra words\n":
                theirs.send(bytes([byte]))
                await asyncio.sleep(0.001)
            theirs.sendall(b"\x16\x03")
            assert await reading == b"1 extra words\n"
            assert ours.recv(16) == b"\x16\x03"
            driver.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("data, message", [
    (b"x" * 100, "protocol line too long"),
    (b"1\nX", "data after its protocol line"),
    (b"", "closed the connection before the protocol line"),
])
def test_protocol_line_garbage(data: bytes, message: str) -> None:
    async def scenario() -> None:
        ours, theirs = _pair()
        with ours, theirs:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            driver = tls_asyncio.Driver(ours.fileno())
            with pytest.raises(ProtocolError, match=message):
                await driver.run(protocol_line_reader(ours), 1)
            driver.close()

    asyncio.run(scenario())


def test_silent_peer_times_out_and_unread_data_does_not_spin_the_loop() -> None:
    """The deadline holds for one whole call; between calls, unread data unregisters the fd
    (after one readiness) instead of waking the loop at every iteration."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _pair()
        with ours, theirs:
            driver = tls_asyncio.Driver(ours.fileno())
            started = loop.time()
            with pytest.raises(TimeoutError):
                await driver.run(protocol_line_reader(ours), 0.2)
            assert 0.2 <= loop.time() - started < 1
            theirs.sendall(b"unexpected")  # arrives while no call is pending
            await asyncio.sleep(0.05)
            assert not loop.remove_reader(ours.fileno())  # no longer registered
            # The next call registers again and reads it.
            theirs.sendall(b"\n")
            assert await driver.run(lambda: ours.recv(64), 1) == b"unexpected\n"
            driver.close()

    asyncio.run(scenario())
