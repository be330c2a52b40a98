# SPDX-License-Identifier: GPL-3.0-or-later
"""The boot benchmark: our agent's initramfs beside Debian's own Mandos dracut module, on the
same base image, in one run (issue 11's table).

The initramfs images are built in throwaway copies of this host's root (peers/vm/images.py),
for the same kernel, the same dracut modules and the same slim network drivers: upstream's
(Debian's ``mandos-client`` and its ``90mandos`` module, which builds only host-only images),
ours (the ``mandos-password-agent`` package built from this tree) host-only as well, so that
both boot the same base, and the base without any Mandos module.  The growth of each over the
base is what it adds; ours is also shown as the tests boot it, generic, over the generic base.

Then the same LUKS disk boots with each, interleaved, ``--runs`` times, on the bridged LAN of
peers/vm/lan.py, IPv6 link-local only, finding our server by Zeroconf as most sites do.  Read
off the serial console, in seconds after qemu started: the disk's passphrase prompt (the
request), the end of systemd-cryptsetup (unlocked) and the root's init (root).  With
``--journal`` the journal is forwarded to the console, so that its lines carry the kernel's
clock (every boot is slower then, upstream's as ours): from the later of
networkd's "Gained IPv6LL" (the link-local address usable) and systemd-cryptsetup's start, to
its end, is the part of the unlock that is the agent's, whatever came before.  Medians are
printed and written to ``bench/results/boot-<time>.md``.

    ./dev bench --boot [--runs N] [--journal] [--logs DIRECTORY]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from peers import upstream
from peers.packages import build
from peers.vm import images, qemu
from peers.vm.boots import DONE, root_command_line, section_for
from peers.vm.lan import VmLan
from peers.zeroconf import OurServerInNamespace

RESULTS = Path(__file__).resolve().parent / "results"
EVENTS = {"request": r"Please enter passphrase for disk",
          "unlocked": r"Finished .*systemd-cryptsetu",
          "root": DONE}
BOOT_TIMEOUT = 120.0
#: With the journal forwarded to the console, lines carry the kernel's clock.  From the later of
#: networkd reporting the link-local address usable (done with duplicate address detection)
#: and systemd-cryptsetup starting, to systemd-cryptsetup done, is the part of the unlock that
#: the agent can make faster; what comes before it (unpacking, dracut's hooks, udev, the link)
#: is the boot's.  Not anchored to a line's start: the passphrase prompt has no newline, so
#: the next line follows it on the same console line.
KERNEL_CLOCK = {
    "network": re.compile(r"\[\s*([0-9.]+)\] systemd-networkd\[\d+\]: \S+: Gained IPv6LL"),
    "started": re.compile(r"\[\s*([0-9.]+)\] systemd\[1\]: Starting systemd-cryptsetup@"),
    "unlocked": re.compile(r"\[\s*([0-9.]+)\] systemd\[1\]: Finished systemd-cryptsetup@"),
}


@dataclass
class Flavour:
    """One initramfs and what its boots measured."""

    name: str
    image: Path
    seconds: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in EVENTS})
    #: Per boot, from the link-local address usable (or systemd-cryptsetup started, if later)
    #: to unlocked, on the kernel's clock.
    network_to_unlocked: list[float] = field(default_factory=list)
    #: The image's size, taken at once: it may live in a directory removed before the report.
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.image.stat().st_size


@dataclass(frozen=True)
class Bases:
    """The sizes of the initramfs without any Mandos module, generic and host-only."""

    generic: int
    hostonly: int


def hostonly_images(vm: images.VmImages, client_deb: Path, work: Path) -> tuple[Path, Bases]:
    """Ours built host-only, as upstream's must be, and the bases without any Mandos module,
    all in one throwaway root with our package installed."""
    sizes = []
    ours = work / "ours-hostonly.img"
    with images.client_root(work, vm.kernel, vm.keydir, client_deb) as root:
        for hostonly in (False, True):
            images.run_dracut(root, vm.kernel, "/tmp/base.img", module=None, hostonly=hostonly)
            sizes.append(int(root.run("stat -c %s /tmp/base.img").stdout))
        images.run_dracut(root, vm.kernel, "/tmp/ours.img", hostonly=True)
        root.run(f"cp {root.root}/tmp/ours.img {ours}", chroot=False)
    return ours, Bases(*sizes)


def boot(flavour: Flavour, vm: images.VmImages, lan: VmLan, log: Path, journal: bool) -> None:
    result = qemu.run(kernel=vm.kernel.vmlinuz, initrd=flavour.image,
                      append=root_command_line(vm.disk, "net.ifnames=0", "ip=eth0:link6",
                                               "rd.neednet=1", *(
                                                   ["systemd.journald.forward_to_console=1"]
                                                   if journal else [])),
                      devices=["-drive", f"file={vm.disk.image},format=raw,if=virtio,"
                               "snapshot=on", *lan.qemu_devices()],
                      log=log, timeout=BOOT_TIMEOUT, done_marker=DONE, wrap=lan.wrap)
    for event, pattern in EVENTS.items():
        at = result.first(pattern)
        if at is None:
            raise SystemExit(f"bench: {flavour.name}: no {event!r} on the console ({log})")
        flavour.seconds[event].append(at)
    if not journal:
        return
    text = result.text
    kernel = {}
    for name, regex in KERNEL_CLOCK.items():
        if (match := regex.search(text)) is None:
            raise SystemExit(f"bench: {flavour.name}: no {name!r} in the journal forwarded "
                             f"to the console ({log})")
        kernel[name] = float(match[1])
    flavour.network_to_unlocked.append(
        kernel["unlocked"] - max(kernel["network"], kernel["started"]))
    print(f"bench: {flavour.name}: " + ", ".join(
        f"{event} {seconds[-1]:.1f} s" for event, seconds in flavour.seconds.items()),
        file=sys.stderr)


def table(bases: Bases, generic: int, flavours: list[Flavour], runs: int, journal: bool
          ) -> str:
    """The report: sizes, then the medians of each event; ``generic`` is the size of ours
    built generic."""
    ours, theirs = flavours
    growth = theirs.size - bases.hostonly
    generic_growth = generic - bases.generic
    lines = [f"Boot benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
             f"{runs} boots of each, interleaved, medians; TCG; both images host-only; load "
             f"average at the end {os.getloadavg()[0]:.1f}.",
             "",
             "| | ours | upstream | ours/upstream |",
             "|---|---|---|---|",
             f"| base without Mandos (zstd) | {bases.hostonly / 1e6:.2f} MB | "
             f"{bases.hostonly / 1e6:.2f} MB | |",
             f"| initramfs (zstd) | {ours.size / 1e6:.2f} MB | {theirs.size / 1e6:.2f} MB | |",
             f"| growth over the base | {(ours.size - bases.hostonly) / 1e6:.2f} MB | "
             f"{growth / 1e6:.2f} MB | {(ours.size - bases.hostonly) / growth:.2f} |",
             f"| ours generic, over the generic base ({bases.generic / 1e6:.2f} MB) | "
             f"{generic_growth / 1e6:.2f} MB | | {generic_growth / growth:.2f} |"]
    for event in EVENTS:
        mine, their = (statistics.median(f.seconds[event]) for f in flavours)
        lines.append(f"| {event} (s after qemu start) | {mine:.1f} | {their:.1f} | "
                     f"{mine / their:.2f} |")
    answer = [statistics.median(u - r for u, r in zip(f.seconds["unlocked"],
                                                      f.seconds["request"], strict=True))
              for f in flavours]
    lines.append(f"| request to unlocked (s) | {answer[0]:.2f} | {answer[1]:.2f} | "
                 f"{answer[0] / answer[1]:.2f} |")
    if not journal:
        return "\n".join(lines) + "\n"
    lines[0] += (" The journal forwarded to the console (--journal): every boot is slower, so "
                 "these times compare only with runs that had it too.")
    mine, their = (statistics.median(f.network_to_unlocked) for f in flavours)
    lines.append(f"| network usable and disk asking, to unlocked (s, kernel clock) | "
                 f"{mine:.2f} | {their:.2f} | {mine / their:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench --boot", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="boots of each (default 3)")
    parser.add_argument("--journal", action="store_true",
                        help="forward the journal to the console and report the agent's part "
                             "of the unlock on the kernel's clock (slows every boot)")
    parser.add_argument("--logs", type=Path, metavar="DIRECTORY",
                        help="keep each boot's serial console there, to see where time goes")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mandos-bench-boot-") as temporary:
        work = Path(temporary)
        debs, _ = build(work / "dist", "--no-lintian")
        (client_deb,) = (deb for deb in debs if deb.name.startswith("mandos-password-agent_"))
        vm = images.build(client_deb)
        upstream_image, upstream_keydir = images.build_upstream()
        (work / "hostonly").mkdir()
        ours, bases = hostonly_images(vm, client_deb, work / "hostonly")
        flavours = [Flavour("ours", ours), Flavour("upstream", upstream_image)]
        sections = (section_for(vm, vm.passphrase) + "\n" + upstream.upstream_section(
            upstream.KeySet.in_directory(upstream_keydir), "vmupstream",
            vm.passphrase.read_bytes()))
        (work / "server").mkdir()
        with VmLan() as lan, OurServerInNamespace(lan.server, sections, work / "server"):
            for run in range(arguments.runs):
                for flavour in flavours:
                    print(f"bench: boot {run + 1}/{arguments.runs} with {flavour.name}",
                          file=sys.stderr)
                    log = (arguments.logs or work) / f"{flavour.name}-{run}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    boot(flavour, vm, lan, log, arguments.journal)
    report = table(bases, vm.initrd.stat().st_size, flavours, arguments.runs,
                   arguments.journal)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"boot-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}.md"
    path.write_text(report)
    print(report + f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
