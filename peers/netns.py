# SPDX-License-Identifier: GPL-3.0-or-later
"""Two network namespaces joined by a veth pair, for tests that need a real link (Zeroconf,
IPv6 link-local, ``--interface``) without touching the host's network.

Each side has ``lo`` up, an IPv4 address in 10.x/24 and its IPv6 link-local address, whose
duplicate address detection has finished before the ``with`` body runs.  Names carry the pid of
the test process, so parallel test runs do not collide; everything is deleted on exit, also
when set-up fails half-way.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peers.process import StartStop

_DAD_TIMEOUT = 10.0
_counter = itertools.count()


@dataclass(frozen=True)
class Side:
    """One end of the pair: its namespace, interface, addresses and interface index (as seen
    inside its namespace)."""

    netns: str
    interface: str
    ipv4: str
    link_local: str
    ifindex: int

    @property
    def scoped_link_local(self) -> str:
        """``fe80::…%interface``, for a peer in *this* namespace; a peer in the other namespace
        needs its own interface (see :meth:`VethPair.peer_of`)."""
        return f"{self.link_local}%{self.interface}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _ip_json(netns: str, *args: str) -> Any:
    output = subprocess.run(["ip", "-n", netns, "-j", *args], check=True, capture_output=True,
                            timeout=10).stdout
    return json.loads(output)


class VethPair(StartStop):
    """Namespaces ``a`` and ``b`` (the :class:`Side` records) with a veth link between them.

    ``run(side_or_ns, argv)`` and ``popen(...)`` run a command inside a namespace via
    ``ip netns exec``.
    """

    def __init__(self, subnet: int | None = None) -> None:
        number = next(_counter)
        tag = f"{os.getpid()}x{number}"
        self._names = (f"mta{tag}", f"mtb{tag}")
        self._interfaces = (f"va{tag}"[:15], f"vb{tag}"[:15])
        third = subnet if subnet is not None else (os.getpid() + number) % 250 + 1
        self._ipv4 = (f"10.{third}.{number % 250}.1", f"10.{third}.{number % 250}.2")
        self._created: list[str] = []
        self.a: Side
        self.b: Side

    def start(self) -> VethPair:
        try:
            for name in self._names:
                _ip("netns", "add", name)
                self._created.append(name)
            (ns_a, ns_b), (if_a, if_b) = self._names, self._interfaces
            _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
                "netns", ns_b)
            for netns, interface, address in zip(self._names, self._interfaces, self._ipv4,
                                                 strict=True):
                _ip("-n", netns, "link", "set", "lo", "up")
                _ip("-n", netns, "addr", "add", f"{address}/24", "dev", interface)
                _ip("-n", netns, "link", "set", interface, "up")
            self.a, self.b = (self._wait_side(netns, interface, address)
                              for netns, interface, address
                              in zip(self._names, self._interfaces, self._ipv4, strict=True))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_side(self, netns: str, interface: str, ipv4: str) -> Side:
        """Wait until the link-local address of ``interface`` is no longer tentative."""
        deadline = time.monotonic() + _DAD_TIMEOUT
        while True:
            (link,) = _ip_json(netns, "-6", "addr", "show", "dev", interface)
            addresses = [a for a in link.get("addr_info", []) if a.get("scope") == "link"]
            if addresses and not any(a.get("tentative") for a in addresses):
                return Side(netns, interface, ipv4, addresses[0]["local"], int(link["ifindex"]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"IPv6 DAD did not finish on {interface} in {netns}")
            time.sleep(0.1)

    def peer_of(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def run(self, where: Side | str, argv: Sequence[str],
            **options: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside a namespace (a :class:`Side` or a namespace name)."""
        return subprocess.run(self.wrap(where, argv), **options)

    def popen(self, where: Side | str, argv: Sequence[str],
              **options: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside a namespace; stop it before the pair is removed."""
        return subprocess.Popen(self.wrap(where, argv), **options)

    @staticmethod
    def wrap(where: Side | str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NS``."""
        netns = where.netns if isinstance(where, Side) else where
        return ["ip", "netns", "exec", netns, *argv]

    def stop(self) -> None:
        # Deleting a namespace destroys the veth pair with it.
        while self._created:
            name = self._created.pop()
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
