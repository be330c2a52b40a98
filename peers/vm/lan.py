# SPDX-License-Identifier: GPL-3.0-or-later
"""A LAN for a VM, inside network namespaces of the test's own.

qemu's user networking (slirp) carries no multicast and no IPv6 link-local traffic, so a boot
over it can only name its server (``mandos=connect:``).  Here the VM's network card is a tap
device on a bridge, in a namespace of its own (``b`` of a :class:`VethPair`); the bridge's
other port is the veth link to namespace ``a``, the "server host", where the servers (ours,
Debian's ``mandos``, ``avahi-daemon``) run on the veth interface.  Zeroconf's multicast and
IPv6 link-local addresses then work between the initramfs and the servers as on a real LAN,
and nothing leaves the namespaces.
"""

from __future__ import annotations

import subprocess

from peers.netns import Side, VethPair
from peers.process import StartStop

#: The VM's network card, a tap device in namespace ``b``.
TAP = "mtap0"
BRIDGE = "mbr0"


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, timeout=10)


class VmLan(StartStop):
    """The server host (:attr:`server`, a :class:`Side`) and a bridge with the VM's tap device
    in the other namespace; qemu runs there (:meth:`wrap`) with :meth:`qemu_devices`."""

    def __init__(self) -> None:
        self.pair = VethPair()

    @property
    def server(self) -> Side:
        return self.pair.a

    def start(self) -> VmLan:
        self.pair.start()
        try:
            lan = self.pair.b
            # Multicast snooping off: a bridge that has seen no querier may otherwise hold
            # back mDNS to ff02::fb.
            _ip(lan.netns, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
            _ip(lan.netns, "addr", "flush", "dev", lan.interface)
            _ip(lan.netns, "link", "set", lan.interface, "master", BRIDGE)
            _ip(lan.netns, "tuntap", "add", "dev", TAP, "mode", "tap")
            _ip(lan.netns, "link", "set", TAP, "master", BRIDGE)
            for device in (TAP, BRIDGE):
                _ip(lan.netns, "link", "set", device, "up")
        except BaseException:
            self.pair.stop()
            raise
        return self

    def stop(self) -> None:
        self.pair.stop()  # the namespaces go, and the bridge and tap device with them

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run in the bridge's namespace (for qemu)."""
        return VethPair.wrap(self.pair.b, argv)

    @staticmethod
    def qemu_devices() -> list[str]:
        return ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0"]
