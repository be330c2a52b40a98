# SPDX-License-Identifier: GPL-3.0-or-later
"""Announce the server with Zeroconf (DNS-SD over mDNS) as ``_mandos._tcp``, without avahi-daemon.

Upstream publishes through avahi-daemon over D-Bus; we answer mDNS ourselves with python-zeroconf's
asyncio API inside the server's event loop, so the server needs neither avahi-daemon nor a system
bus.  What upstream's ``mandos-client`` (libavahi-core) needs in order to find us was found by
experiment, Debian's mandos-client 1.8.16 against python-zeroconf across two network namespaces
(tests/test_zeroconf_interop.py keeps it so):

* the records go out over IPv6 *and* IPv4 (``IPVersion.All``; ``V4Only`` with ``--no-ipv6``), and
  each transport must carry an address of its own family: the client resolves the address family
  of the transport it heard the PTR on, and waits forever if that family is missing.  So the
  addresses are the link-local IPv6 address of each announced interface plus its IPv4 addresses,
  as bare ``inet_pton`` bytes (the client scopes a link-local address to the interface it heard it
  on);
* the TXT record is empty, as upstream's, and the SRV target is a real ``<hostname>.local.``.

Registration probes the link for about 1.6 s.  :meth:`Announcer.start` only opens the sockets and
schedules the registration as a task, so that the server is serving (and tells systemd so) at
once; the task logs its outcome through ``log`` and :meth:`Announcer.wait_registered` waits for it.
A name already in use is renamed the way avahi does it for upstream ("Mandos" becomes
"Mandos #2", then "Mandos #3", ...), not python-zeroconf's "Mandos-2".  python-zeroconf checks for
collisions only while probing; a conflicting announcement that arrives later (two links joined,
a host that did not probe) is caught here, as avahi catches it for upstream: another responder's
SRV record for our name with other data (RFC 6762 section 9) makes us withdraw the name and
register under the next one.

With several interfaces every interface's addresses are announced on every interface (one
python-zeroconf instance answers for all); a client takes the first address of its link's family
that answers.  Give ``--interface`` on multi-homed hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path

import ifaddr
from zeroconf import (
    DNSQuestion,
    DNSService,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _TYPE_SRV

from mandos_protocol.wire import SERVICE_TYPE

#: As upstream's ``AvahiService.max_renames``.
MAX_RENAMES = 32768

#: How long a fresh interface may keep its link-local address tentative (duplicate address
#: detection takes about 2 s) before we announce without waiting any longer.
DAD_WAIT = 10.0
_DAD_POLL = 0.1

_IF_INET6 = Path("/proc/net/if_inet6")
_IFA_F_TENTATIVE = 0x40
_IFA_F_DADFAILED = 0x08
_SCOPE_LINK = 0x20

_ALTERNATIVE = re.compile(r"^(.*) #([1-9][0-9]*)$", re.DOTALL)
_LABEL_MAX = 63

_logger = logging.getLogger(__name__)


def alternative_service_name(name: str) -> str:
    """The next name to try after a collision, as avahi's ``avahi_alternative_service_name``:
    "Mandos" -> "Mandos #2" -> "Mandos #3", cut (at a character boundary) to fit a DNS label
    of 63 bytes."""
    match = _ALTERNATIVE.match(name)
    if match is None:
        return f"{_cut(name, _LABEL_MAX - 3)} #2"
    number = str(int(match.group(2)) + 1)
    return f"{_cut(match.group(1), _LABEL_MAX - len(number) - 2)} #{number}"


def _cut(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` bytes of UTF-8, without a broken character."""
    return text.encode()[:size].decode(errors="ignore")


def _link_local_ipv6() -> dict[str, list[tuple[str, bool]]]:
    """Link-local IPv6 addresses by interface name, each with whether it is still tentative.

    Read from ``/proc/net/if_inet6`` because it alone tells tentative addresses (not usable as a
    source until duplicate address detection is done) from usable ones.
    """
    result: dict[str, list[tuple[str, bool]]] = {}
    try:
        lines = _IF_INET6.read_text().splitlines()
    except OSError:
        return result  # IPv6 disabled in this kernel
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or int(fields[3], 16) != _SCOPE_LINK:
            continue
        flags = int(fields[4], 16)
        if flags & _IFA_F_DADFAILED:
            continue
        address = str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
        result.setdefault(fields[5], []).append((address, bool(flags & _IFA_F_TENTATIVE)))
    return result


def _ipv4_by_interface() -> dict[str, list[str]]:
    """Non-loopback IPv4 addresses by interface name."""
    result: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback:
                result.setdefault(adapter.name, []).append(ip.ip)
    return result


class _ConflictWatch(RecordUpdateListener):
    """Calls ``on_conflict`` (once) when another responder announces an SRV record for the
    registered name with other data than ours; our own announcements, echoed back, match."""

    def __init__(self, info: AsyncServiceInfo, on_conflict: Callable[[], None]) -> None:
        super().__init__()
        self.name = info.name.lower()
        assert info.server is not None
        self.ours = (info.server.lower(), info.port)
        self._on_conflict: Callable[[], None] | None = on_conflict

    def question(self) -> DNSQuestion:
        return DNSQuestion(self.name, _TYPE_SRV, _CLASS_IN)

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]
                             ) -> None:
        for update in records:
            record = update.new
            if (self._on_conflict is not None and isinstance(record, DNSService)
                    and record.name.lower() == self.name and record.ttl > 0
                    and (record.server.lower(), record.port) != self.ours):
                on_conflict, self._on_conflict = self._on_conflict, None
                on_conflict()


class Announcer:
    """The server's ``_mandos._tcp`` announcement on one interface or on all of them."""

    def __init__(self, port: int, servicename: str = "Mandos", interface: str | None = None,
                 ipv6: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.port = port
        self.servicename = servicename
        self.interface = interface
        self.ipv6 = ipv6
        self._log = log if log is not None else _logger.info
        self._name = servicename
        self._zeroconf: AsyncZeroconf | None = None
        self._task: asyncio.Task[bool] | None = None
        self._registered: AsyncServiceInfo | None = None
        self._watch: _ConflictWatch | None = None

    @property
    def name(self) -> str:
        """The service name registered, or being probed for while registration is under way."""
        return self._name

    async def start(self) -> None:
        """Open the mDNS sockets and schedule the registration; returns without waiting for it.

        A failure is logged, not raised: the server serves clients given ``--connect`` just as
        well without an announcement.
        """
        try:
            self._zeroconf = AsyncZeroconf(
                interfaces=self._interfaces(),
                ip_version=IPVersion.All if self.ipv6 else IPVersion.V4Only,
            )
        except OSError as error:
            self._log(f"Zeroconf: cannot open the mDNS sockets ({error}); the server is not "
                      "announced")
            return
        self._task = asyncio.get_running_loop().create_task(self._register())

    async def wait_registered(self) -> bool:
        """Wait until registration has ended; whether the service is announced."""
        if self._task is None:
            return False
        return await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Withdraw the announcement (goodbye packets) and close the sockets."""
        self._unwatch()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._zeroconf is not None:
            await self._zeroconf.async_close()  # unregisters every service: sends goodbyes
            self._zeroconf = None

    def _interfaces(self) -> list[str | int]:
        """What to hand to python-zeroconf as its interfaces: IPv4 addresses and, for IPv6,
        interface indexes; everything but loopback unless ``interface`` restricts it."""
        chosen: list[str | int] = []
        for name, addresses in _ipv4_by_interface().items():
            if self.interface in (None, name):
                chosen.extend(addresses)
        if self.ipv6:
            for name in _link_local_ipv6():
                if self.interface in (None, name) and name != "lo":
                    chosen.append(socket.if_nametoindex(name))
        return chosen

    async def _addresses(self) -> list[bytes]:
        """Our addresses as bare ``inet_pton`` bytes: link-local IPv6 (after duplicate address
        detection, waiting for it a while) first, then IPv4."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DAD_WAIT
        while True:
            link_local = {name: addresses for name, addresses in _link_local_ipv6().items()
                          if self.interface in (None, name) and name != "lo"}
            tentative = any(pending for addresses in link_local.values()
                            for _, pending in addresses)
            if not (self.ipv6 and tentative and loop.time() < deadline):
                break
            await asyncio.sleep(_DAD_POLL)
        packed: list[bytes] = []
        if self.ipv6:
            packed.extend(socket.inet_pton(socket.AF_INET6, address)
                          for addresses in link_local.values()
                          for address, pending in addresses if not pending)
        for name, ipv4 in _ipv4_by_interface().items():
            if self.interface in (None, name):
                packed.extend(socket.inet_pton(socket.AF_INET, address) for address in ipv4)
        return packed

    def _unwatch(self) -> None:
        if self._watch is not None and self._zeroconf is not None:
            self._zeroconf.zeroconf.async_remove_listener(self._watch)
        self._watch = None

    def _conflict(self) -> None:
        """Another responder took our name after we registered it: give it up and register
        under the next name, as avahi does for upstream."""
        self._task = asyncio.get_running_loop().create_task(self._rename())

    async def _rename(self) -> bool:
        assert self._zeroconf is not None and self._registered is not None
        self._unwatch()
        registered, self._registered = self._registered, None
        await self._zeroconf.async_unregister_service(registered)
        return await self._register(self._next_name(self._name))

    def _next_name(self, name: str) -> str:
        """The name to take after a collision on ``name``, logged as upstream logs it."""
        name = alternative_service_name(name)
        self._log(f"Zeroconf service name collision; changing Zeroconf service name to "
                  f"{name!r}")
        return name

    async def _register(self, name: str | None = None) -> bool:
        """Register under ``name`` (default: ``servicename``), renamed after each collision;
        log the outcome, and watch for a later conflict."""
        assert self._zeroconf is not None
        addresses = await self._addresses()
        if not addresses:
            where = (f"interface {self.interface} (does it exist, and is it up?)"
                     if self.interface else "any interface")
            self._log(f"Zeroconf: no usable address on {where}; the server is not announced")
            return False
        server = f"{socket.gethostname().split('.')[0]}.local."
        name = name or self.servicename
        for _ in range(MAX_RENAMES + 1):
            self._name = name
            info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=self.port,
                                    properties={}, server=server, addresses=addresses)
            try:
                announced = await self._zeroconf.async_register_service(info)
            except NonUniqueNameException:
                name = self._next_name(name)
                continue
            except Exception as error:  # the server keeps serving without an announcement
                self._log(f"Zeroconf registration of {name!r} failed: {error!r}")
                return False
            await announced
            self._log(f"Zeroconf service {name!r} established on port {self.port}")
            self._registered = info
            self._watch = _ConflictWatch(info, self._conflict)
            self._zeroconf.zeroconf.async_add_listener(self._watch, self._watch.question())
            return True
        self._log(f"No suitable Zeroconf service name found after {MAX_RENAMES} renames")
        return False
