# SPDX-License-Identifier: GPL-3.0-or-later
"""Find Mandos servers with Zeroconf: browse ``_mandos._tcp.local.`` and resolve what answers.

The agent imports this module only when it has no ``--connect`` list, because importing
python-zeroconf costs about 40 ms of the initramfs' time.  The browser listens over IPv6 and IPv4
(``IPVersion.All``): upstream's server announces over IPv6 only (unless ``--no-ipv6``), with only
its link-local address (avahi-daemon publishes no A record on the IPv6 link), so an IPv4-only
browser would never see it.
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

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import queue
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ifaddr
from zeroconf import (
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from mandos_protocol.wire import SERVICE_TYPE

log = logging.getLogger(__name__)

#: Once one server is resolved, how long the browse goes on for others in the same round: the
#: servers answer the same query, and an mDNS responder delays its answer with shared records
#: (the PTR) by 20-120 ms (RFC 6762, section 6), so 0.15 s collects them.  The first server is
#: asked meanwhile (:meth:`Browser.discover`), so no boot waits for it; a server that comes
#: later still joins the next round, as the browse stays open while requests are pending.
GRACE = 0.15
#: With no server found yet, a browse older than this is started afresh.
RESTART_SECONDS = 2.0
#: While waiting for the first server, how often the interfaces are looked at again.
POLL_SECONDS = 0.1


def _is_loopback(adapter: ifaddr.Adapter) -> bool:
    return all(ipaddress.ip_address(ip.ip if isinstance(ip.ip, str) else ip.ip[0]).is_loopback
               for ip in adapter.ips)


#: From <linux/if_addr.h>: an address still in duplicate address detection, or failed it.
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08


def _ipv6_ready(if_inet6: Path = Path("/proc/net/if_inet6")) -> set[str]:
    """The interfaces with an IPv6 address that is done with duplicate address detection:
    until then it cannot be bound, and mDNS over IPv6 on that interface finds nothing."""
    try:
        lines = if_inet6.read_text().splitlines()
    except OSError:
        return set()
    ready = set()
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and not int(fields[4], 16) & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            ready.add(fields[5])
    return ready


def _interfaces(interface: str | None) -> list[str | int]:
    """python-zeroconf's interface list: the IPv4 addresses, and the index for IPv6 once an
    address there is usable, of ``interface``, or of every interface but loopback; empty if
    there is none (yet).

    Not ``InterfaceChoice.All``: that takes loopback too, and mDNS sent from ``::1`` to
    ``ff02::fb`` fails with ENETUNREACH, which python-zeroconf logs with a traceback on every
    browse of an IPv6-only initramfs (found booting one on a bridged LAN)."""
    chosen: list[str | int] = []
    ready = _ipv6_ready()
    for adapter in ifaddr.get_adapters():
        if adapter.name == interface or (interface is None and not _is_loopback(adapter)):
            chosen += [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
            if adapter.name in ready:
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


class Browser:
    """A Zeroconf browse kept open while requests are pending, so that a server that comes up
    later (a cold-rack start: the server boots too) is noticed when it announces itself, not
    at the agent's next round.

    :meth:`discover` gives the servers as they are resolved; :meth:`fileno` turns readable
    when an announcement arrives, for the agent's waits between rounds.  Until a first server
    is found, the browse starts afresh whenever the usable interfaces change (a link comes up,
    a link-local address finishes duplicate address detection: before that it cannot be
    bound, and a browse over it finds nothing) and at every call of :meth:`discover` after
    :data:`RESTART_SECONDS`.
    """

    def __init__(self, interface: str | None = None) -> None:
        self.interface = interface
        self._scope = None if interface is None else socket.if_nametoindex(interface)
        self._zeroconf: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._interfaces: list[str | int] = []
        self._started = 0.0
        self._names: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._found: dict[str, list[tuple[str, int]]] = {}
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def browsing(self) -> bool:
        """Whether a browse runs: false until an interface has a usable address."""
        return self._zeroconf is not None

    def fileno(self) -> int:
        """Readable once an announcement arrived since the last :meth:`discover`."""
        return self._wake_read

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        # Runs in python-zeroconf's thread: resolving here would block its loop.
        self._names.put((name, state_change is not ServiceStateChange.Removed))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")

    def _restart(self, interfaces: list[str | int]) -> None:
        """A fresh browse on ``interfaces``."""
        self._stop()
        log.debug("Zeroconf: browsing on %s", ", ".join(map(str, interfaces)))
        self._interfaces = interfaces
        self._started = time.monotonic()
        self._zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.All)
        self._browser = ServiceBrowser(self._zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _resolve(self, zeroconf: Zeroconf, name: str, seconds: float,
                 stop: Callable[[], bool]) -> list[tuple[str, int]]:
        """``name``'s addresses, best first, resolved within ``seconds`` (at once when its
        announcement carried them, as avahi's and python-zeroconf's do).  Waited for in steps
        of :data:`POLL_SECONDS` on python-zeroconf's loop, so that ``stop`` ends it early."""
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zeroconf):
            assert zeroconf.loop is not None  # started with the Zeroconf
            request = asyncio.run_coroutine_threadsafe(
                info.async_request(zeroconf, max(1, int(seconds * 1000))), zeroconf.loop)
            while not stop():
                try:
                    if not request.result(POLL_SECONDS):
                        return []
                    break
                except concurrent.futures.TimeoutError:
                    continue
            else:
                request.cancel()
                return []
        if not info.port:
            return []
        addresses = [(usable, info.port) for host in info.parsed_scoped_addresses(IPVersion.All)
                     if (usable := _usable(host, self._scope)) is not None]
        if addresses:
            self._found[name] = addresses
        return sorted(addresses, key=lambda pair: _order(pair[0]))

    def discover(self, timeout: float, stop: Callable[[], bool] = lambda: False,
                 stop_fd: int | None = None) -> Iterator[tuple[str, int]]:
        """``(host, port)`` of each Mandos server as it is found: first those found before,
        best first, then each newly resolved one at once (the agent starts asking it while
        the browse goes on).  With none found before, waits up to ``timeout`` seconds for one
        (and for an interface to browse on, early in the boot), and ends :data:`GRACE`
        seconds after the first is resolved.

        The browse ends early once ``stop()`` is true: it is asked whenever ``stop_fd`` turns
        readable, and every :data:`POLL_SECONDS`.  A password found, or SIGTERM at
        switch-root, must not wait for the round's end."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)
        known = self._known()
        given = set(known)
        yield from known
        deadline = time.monotonic() + (timeout if not given else 0)
        if not given and (self._zeroconf is None
                          or time.monotonic() - self._started > RESTART_SECONDS):
            self._stop()  # started afresh below, on the interfaces there are then
        while not stop():
            if not self._found:
                interfaces = _interfaces(self.interface)
                if interfaces and (self._zeroconf is None or interfaces != self._interfaces):
                    self._restart(interfaces)  # the first, or a link that came up meanwhile
            try:
                name, present = self._names.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._pause(min(left, POLL_SECONDS), stop_fd)
                continue
            if self._zeroconf is None:
                continue  # an announcement to a browse since stopped
            log.debug("Zeroconf: %s %s", name, "announced" if present else "withdrawn")
            if not present:
                self._found.pop(name, None)
                continue
            first = not self._found
            for address in self._resolve(self._zeroconf, name,
                                         max(1.0, deadline - time.monotonic()), stop):
                if address not in given:
                    given.add(address)
                    yield address
            if first and self._found:
                deadline = min(deadline, time.monotonic() + GRACE)

    def _pause(self, seconds: float, stop_fd: int | None) -> None:
        """Sleep ``seconds``, or until an announcement arrives or ``stop_fd`` is readable."""
        select.select([self._wake_read] + ([] if stop_fd is None else [stop_fd]), [], [],
                      seconds)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)

    def _known(self) -> list[tuple[str, int]]:
        """Every address found so far, best first, each once."""
        known = dict.fromkeys(address for found in self._found.values() for address in found)
        return sorted(known, key=lambda pair: _order(pair[0]))

    def servers(self, timeout: float) -> list[tuple[str, int]]:
        """``(host, port)`` of every Mandos server found by :meth:`discover`, best first."""
        for _ in self.discover(timeout):
            pass
        return self._known()

    def _stop(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zeroconf is not None:
            self._zeroconf.close()
            self._zeroconf = None

    def close(self) -> None:
        self._stop()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def browse(timeout: float, interface: str | None = None) -> list[tuple[str, int]]:
    """One browse: :meth:`Browser.servers` of a fresh :class:`Browser`."""
    with Browser(interface) as browser:
        return browser.servers(timeout)
