# SPDX-License-Identifier: GPL-3.0-or-later
"""Which Mandos servers to ask: the ``--connect`` list in order, else Zeroconf browsing.

``--connect`` takes what upstream's ``mandos-client`` takes, ``ADDRESS:PORT`` split on the last
colon (so ``fe80::1%eth0:4711`` works), and also the bracketed form ``[::1]:4711``.  A link-local
IPv6 address without a ``%scope`` gets the ``--interface`` as its scope.

``--interface`` is upstream's comma-separated list (:func:`parse_interfaces`).  Upstream brings
the listed interfaces up; here the initramfs' network service does that, and the agent only
gives them up to ``--delay`` seconds to come up.  Exactly one name also confines browsing to
that interface and scopes link-local ``--connect`` addresses to it, as upstream does.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from password_agent.errors import AgentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Server:
    """One Mandos server address: a host name or IP literal (IPv6 with an optional ``%scope``,
    no brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Interfaces:
    """What ``--interface NAME[,NAME...]`` asks for."""

    #: The one interface to browse on and to scope link-local addresses to, if exactly one
    #: name (other than ``none``) was given; else browsing uses every interface.
    only: str | None = None
    #: The interfaces to give ``--delay`` seconds to come up: those named before ``none``.
    awaited: tuple[str, ...] = ()


def parse_interfaces(text: str | None) -> Interfaces:
    """``--interface`` as upstream reads it: names separated by commas; ``none`` ends the list
    of interfaces to bring up (and alone means none); an empty value means all of them."""
    names = [name for name in (text or "").split(",") if name]
    awaited = tuple(names[:names.index("none")] if "none" in names else names)
    only = names[0] if len(names) == 1 and names[0] != "none" else None
    return Interfaces(only, awaited)


def _is_link_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.is_link_local


def parse_connect(text: str, interface: str | None = None) -> Server:
    """A ``--connect`` value as a :class:`Server`; :class:`AgentError` if it is not one."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise AgentError(f"--connect {text!r}: expected [IPV6-ADDRESS]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise AgentError(f"--connect {text!r}: expected ADDRESS:PORT")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not host or not 0 < port < 65536:
        raise AgentError(f"--connect {text!r}: expected ADDRESS:PORT with a port from 1 to "
                         "65535")
    if interface and "%" not in host and _is_link_local(host):
        host = f"{host}%{interface}"
    return Server(host, port)


#: Operational states of an interface that is up (loopback and some virtual links say
#: "unknown").
_UP = ("up", "unknown")


def _operstate(sys_class_net: Path, interface: str) -> str:
    try:
        return (sys_class_net / interface / "operstate").read_text().strip()
    except OSError:
        return "missing"


def wait_for_interfaces(interfaces: tuple[str, ...], delay: float, sys_class_net: Path = Path(
        "/sys/class/net")) -> None:
    """Give ``interfaces`` up to ``delay`` seconds in all to come up (upstream's ``--delay``);
    carry on regardless, since the retries cover a slow network too."""
    until = time.monotonic() + delay
    waiting = list(interfaces)
    while True:
        states = {name: _operstate(sys_class_net, name) for name in waiting}
        waiting = [name for name, state in states.items() if state not in _UP]
        if not waiting:
            return
        if time.monotonic() >= until:
            for name in waiting:
                log.info("interface %s is %s after %.1f s; trying anyway", name, states[name],
                         delay)
            return
        time.sleep(0.1)
