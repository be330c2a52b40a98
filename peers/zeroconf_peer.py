# SPDX-License-Identifier: GPL-3.0-or-later
"""Our Zeroconf ends as programs, to run inside a test's network namespace with
``ip netns exec NS .venv/bin/python -m peers.zeroconf_peer ...``.

* ``announce PORT [--name N] [--interface I] [--key-id K --secret-file F]``: an
  :class:`~server.announce.Announcer`, plus (with ``--key-id``) a minimal blocking Mandos server
  built on the library's server role that hands the blob in ``--secret-file`` to that key id.
  Prints ``LISTENING`` once the TCP socket listens and ``REGISTERED <name>`` (or ``FAILED``) when
  registration has ended; SIGTERM withdraws the announcement and exits.
* ``squat PORT ADDRESS [--name N]``: announces N (default "Mandos") for PORT at ADDRESS
  under the host name ``squatter.local.`` *without probing first* (python-zeroconf's
  ``cooperating_responders``), as a host does whose link was down while it probed: a late
  conflict for whoever holds N.  Prints ``REGISTERED <name>``; SIGTERM withdraws it.
* ``browse TIMEOUT [--interface I]``: prints :func:`~password_agent.browse.browse`'s result as
  JSON.
* ``names TIMEOUT``: prints the instance names of the ``_mandos._tcp`` services seen within
  TIMEOUT seconds, with each one's resolved addresses and port, as JSON (a browser that shows
  names, which :func:`~password_agent.browse.browse` does not return).  It queries from a port
  of its own (``unicast=True``, RFC 6762 "legacy unicast"), so that it also sees a responder in
  its own namespace: answers to a QU question go by unicast to port 5353, where the kernel hands
  them to just one of the sockets bound there, maybe the responder's own.
* ``fetch HOST PORT KEYDIR OUTPUT``: fetches a blob with the library's client role and writes it
  to OUTPUT (in the test's private directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from mandos_protocol.gnutls import Credentials, Priority, Session
from mandos_protocol.wire import PROTOCOL_LINE, key_id, normalize_key_id, resumable_send

_TLS_TIMEOUT = 5.0
_BLOB_LIMIT = 1 << 20


def _serve(listener: socket.socket, wanted_key_id: str, secret: bytes) -> None:
    """Accept connections forever; send ``secret`` to the client whose key id is wanted."""
    credentials, priority = Credentials(), Priority()
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(_TLS_TIMEOUT)
            with contextlib.suppress(Exception):  # a bad peer must not end the loop
                line = b""
                while not line.endswith(b"\n") and len(line) < 64:
                    chunk = connection.recv(1)
                    if not chunk:
                        break
                    line += chunk
                with Session.for_mandos_server(connection.fileno(), credentials, priority,
                                               timeout=_TLS_TIMEOUT) as session:
                    session.handshake()
                    if key_id(session.peer_public_key()) == normalize_key_id(wanted_key_id):
                        resumable_send(session.send, secret)()
                    session.bye(wait_for_peer=False)


async def _announce(arguments: argparse.Namespace) -> None:
    from server.announce import Announcer

    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", arguments.port))
    listener.listen(16)
    if arguments.key_id:
        secret = Path(arguments.secret_file).read_bytes()
        threading.Thread(target=_serve, args=(listener, arguments.key_id, secret),
                         daemon=True).start()
    print("LISTENING", flush=True)
    announcer = Announcer(arguments.port, arguments.name, arguments.interface,
                          log=lambda message: print(f"LOG {message}", flush=True))
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    await announcer.start()
    ok = await announcer.wait_registered()
    print(f"REGISTERED {announcer.name}" if ok else "FAILED", flush=True)
    await stopped.wait()
    await announcer.stop()


async def _squat(arguments: argparse.Namespace) -> None:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    service_type = "_mandos._tcp.local."
    info = AsyncServiceInfo(service_type, f"{arguments.name}.{service_type}",
                            port=arguments.port, properties={}, server="squatter.local.",
                            addresses=[socket.inet_pton(socket.AF_INET, arguments.address)])
    zeroconf = AsyncZeroconf(ip_version=IPVersion.All)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    try:
        await (await zeroconf.async_register_service(info, allow_name_change=False,
                                                     cooperating_responders=True))
        print(f"REGISTERED {arguments.name}", flush=True)
        await stopped.wait()
    finally:
        await zeroconf.async_close()


def _names(timeout: float) -> dict[str, tuple[list[str], int]]:
    from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

    service_type = "_mandos._tcp.local."
    seen: dict[str, None] = {}
    zeroconf = Zeroconf(ip_version=IPVersion.All, unicast=True)
    try:
        browser = ServiceBrowser(zeroconf, service_type,
                                 handlers=[lambda name, **_: seen.setdefault(name)])
        time.sleep(timeout)
        browser.cancel()
        result: dict[str, tuple[list[str], int]] = {}
        for name in list(seen):
            info = ServiceInfo(service_type, name)
            if info.request(zeroconf, 3000):
                result[name.removesuffix("." + service_type)] = (
                    info.parsed_scoped_addresses(IPVersion.All), info.port or 0)
        return result
    finally:
        zeroconf.close()


def _fetch(arguments: argparse.Namespace) -> None:
    keydir = Path(arguments.keydir)
    credentials = Credentials.raw_public_key_files(keydir / "tls-pubkey.pem",
                                                   keydir / "tls-privkey.pem")
    with socket.create_connection((arguments.host, arguments.port), timeout=_TLS_TIMEOUT) as sock:
        sock.sendall(PROTOCOL_LINE)
        with credentials, Priority() as priority, Session.for_mandos_client(
                sock.fileno(), credentials, priority, timeout=_TLS_TIMEOUT) as session:
            session.handshake()
            blob = session.recv_all(_BLOB_LIMIT)
    Path(arguments.output).write_bytes(blob)


def main() -> None:
    parser = argparse.ArgumentParser(prog="zeroconf_peer")
    commands = parser.add_subparsers(dest="command", required=True)
    announce = commands.add_parser("announce")
    announce.add_argument("port", type=int)
    announce.add_argument("--name", default="Mandos")
    announce.add_argument("--interface")
    announce.add_argument("--key-id")
    announce.add_argument("--secret-file")
    squat = commands.add_parser("squat")
    squat.add_argument("port", type=int)
    squat.add_argument("address")
    squat.add_argument("--name", default="Mandos")
    browse = commands.add_parser("browse")
    browse.add_argument("timeout", type=float)
    browse.add_argument("--interface")
    names = commands.add_parser("names")
    names.add_argument("timeout", type=float)
    fetch = commands.add_parser("fetch")
    fetch.add_argument("host")
    fetch.add_argument("port", type=int)
    fetch.add_argument("keydir")
    fetch.add_argument("output")
    arguments = parser.parse_args()
    if arguments.command == "announce":
        asyncio.run(_announce(arguments))
    elif arguments.command == "squat":
        asyncio.run(_squat(arguments))
    elif arguments.command == "browse":
        from password_agent.browse import browse as browse_servers

        json.dump(browse_servers(arguments.timeout, arguments.interface), sys.stdout)
    elif arguments.command == "names":
        json.dump(_names(arguments.timeout), sys.stdout)
    else:
        _fetch(arguments)


if __name__ == "__main__":
    main()
