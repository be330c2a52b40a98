"""Find Mandos servers with Zeroconf: browse ``_mandos._tcp.local.`` and resolve what answers.

The agent imports this module only when it has no ``--connect`` list, because importing
python-zeroconf costs about 40 ms of the initramfs' time.  The browser listens over IPv6 and IPv4
(``IPVersion.All``): upstream's server announces over IPv6 only (unless ``--no-ipv6``), with only
its link-local address, so an IPv4-only browser would never see it (``reference/zeroconf.md``).
Link-local addresses come back with their ``%scope`` (``parsed_scoped_addresses()``), which
``socket.create_connection`` understands.  Upstream's empty TXT record shows up as
``{b'': None}`` and is ignored, as upstream's client ignores it.

The first questions ask for unicast answers (python-zeroconf's default, QU): a server answers
them at once (about 0.45 s for a whole browse, against 1.5 s when asking for multicast
answers).  A unicast answer goes to port 5353, though, and if another mDNS stack on this host
(avahi-daemon, systemd-resolved) listens there too, the kernel may hand it to that one; the
follow-up questions, a second later, ask for multicast answers, which reach everyone.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import time

import ifaddr
from zeroconf import (
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

SERVICE_TYPE = "_mandos._tcp.local."

#: Once one server is resolved, how long to wait for others before returning.
GRACE = 0.3


def _is_loopback(adapter: ifaddr.Adapter) -> bool:
    return all(ipaddress.ip_address(ip.ip if isinstance(ip.ip, str) else ip.ip[0]).is_loopback
               for ip in adapter.ips)


def _interfaces(interface: str | None) -> list[str | int]:
    """python-zeroconf's interface list: the IPv4 addresses, and the index for IPv6, of
    ``interface``, or of every interface but loopback; empty if there is none (yet).

    Not ``InterfaceChoice.All``: that takes loopback too, and mDNS sent from ``::1`` to
    ``ff02::fb`` fails with ENETUNREACH, which python-zeroconf logs with a traceback on every
    browse of an IPv6-only initramfs (found booting one on a bridged LAN)."""
    chosen: list[str | int] = []
    for adapter in ifaddr.get_adapters():
        if adapter.name == interface or (interface is None and not _is_loopback(adapter)):
            chosen += [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
            if any(isinstance(ip.ip, tuple) for ip in adapter.ips):
                chosen.append(socket.if_nametoindex(adapter.name))
    return chosen


def _usable(host: str, scope: int | None) -> str | None:
    """``host`` as it can be connected to, or None.

    A link-local IPv6 address needs its scope.  python-zeroconf knows it only when the AAAA
    record came in over IPv6; a responder that sends its AAAA over IPv4 too (python-zeroconf
    does) may leave it unscoped.  With ``interface`` given its index is the scope (and another
    scope means another link); without, an unscoped link-local address is dropped: the
    server's other addresses, or the next browse, will do.
    """
    address, _, zone = host.partition("%")
    parsed = ipaddress.ip_address(address)
    if parsed.version == 4 or not parsed.is_link_local:
        return host
    if zone:
        return host if scope is None or zone == str(scope) else None
    return f"{address}%{scope}" if scope is not None else None


def _order(host: str) -> int:
    """Sort key: IPv6 link-local first, then other IPv6, then IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if address.version == 6:
        return 0 if address.is_link_local else 1
    return 2


def browse(timeout: float, interface: str | None = None) -> list[tuple[str, int]]:
    """``(host, port)`` of the Mandos servers announced on the link, best first.

    Returns :data:`GRACE` seconds after the first server is resolved, or an empty list after
    ``timeout`` seconds.  With ``interface``, only that interface is used, else every one but
    loopback; if there is none with an address yet (early boot), the result is empty at once
    so that the caller retries.
    """
    interfaces = _interfaces(interface)
    if not interfaces:
        return []
    scope = None if interface is None else socket.if_nametoindex(interface)
    deadline = time.monotonic() + timeout
    found: queue.SimpleQueue[str] = queue.SimpleQueue()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        # Runs in python-zeroconf's thread: resolving here would block its loop.
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            found.put(name)

    results: dict[tuple[str, int], None] = {}
    zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.All)
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    name = found.get(timeout=remaining)
                except queue.Empty:
                    break
                info = ServiceInfo(SERVICE_TYPE, name)
                if not info.request(zeroconf, max(1, int(remaining * 1000))):
                    continue
                for host in info.parsed_scoped_addresses(IPVersion.All):
                    usable = _usable(host, scope)
                    if usable is not None and info.port:
                        results[(usable, info.port)] = None
                if results:
                    deadline = min(deadline, time.monotonic() + GRACE)
        finally:
            browser.cancel()
    finally:
        zeroconf.close()
    return sorted(results, key=lambda pair: _order(pair[0]))
