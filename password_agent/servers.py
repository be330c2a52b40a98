"""Which Mandos servers to ask: the ``--connect`` list in order, else Zeroconf browsing.

``--connect`` takes what upstream's ``mandos-client`` takes, ``ADDRESS:PORT`` split on the last
colon (so ``fe80::1%eth0:4711`` works), and also the bracketed form ``[::1]:4711``.  A link-local
IPv6 address without a ``%scope`` gets the ``--interface`` as its scope.
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


def find_servers(connect: list[Server], interface: str | None, browse_timeout: float
                 ) -> list[Server]:
    """The servers to try this round: ``connect`` if given, else those Zeroconf finds now."""
    if connect:
        return connect
    from password_agent import browse  # zeroconf costs 40 ms to import; only here

    found = [Server(host, port) for host, port in browse.browse(browse_timeout, interface)]
    if found:
        log.info("Zeroconf found %s", ", ".join(str(server) for server in found))
    else:
        log.info("Zeroconf found no Mandos server")
    return found


def wait_for_interface(interface: str, delay: float, sys_class_net: Path = Path(
        "/sys/class/net")) -> None:
    """Give ``interface`` up to ``delay`` seconds to come up (upstream's ``--delay``); carry on
    regardless, since the retries cover a slow network too."""
    operstate = sys_class_net / interface / "operstate"
    until = time.monotonic() + delay
    while True:
        try:
            state = operstate.read_text().strip()
        except OSError:
            state = "missing"
        if state in ("up", "unknown"):  # loopback and some virtual links say "unknown"
            return
        if time.monotonic() >= until:
            log.info("interface %s is %s after %.1f s; trying anyway", interface, state, delay)
            return
        time.sleep(0.1)
