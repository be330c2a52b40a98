# SPDX-License-Identifier: GPL-3.0-or-later
"""Boots on a real LAN (peers/vm/lan.py: a tap device bridged to a veth link, in network
namespaces of the test's own): the initramfs finds its server by Zeroconf with nothing
configured, over IPv6 link-local, as most Mandos sites run it.

The guest's network comes from the kernel command line: ``ip=eth0:link6`` is an IPv6-only
link with nothing but its link-local address (no DHCP, no router); ``net.ifnames=0`` keeps the
name ``eth0``.
"""

from __future__ import annotations

import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import upstream
from peers.dbus import PrivateSystemBus
from peers.upstream import UpstreamServer
from peers.vm import images, qemu
from peers.vm.boots import (
    BOOT_TIMEOUT,
    CLIENT,
    DONE,
    console_context,
    root_command_line,
    section_for,
)
from peers.vm.lan import VmLan
from peers.zeroconf import PORT as ZEROCONF_PORT
from peers.zeroconf import AvahiDaemon, BackgroundProgram, OurServerInNamespace

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IPV6_ONLY = ("net.ifnames=0", "ip=eth0:link6", "rd.neednet=1")


@pytest.fixture
def lan() -> Iterator[VmLan]:
    with VmLan() as running:
        yield running


def boot_on(lan: VmLan, vm_images: images.VmImages, log: Path, *extra: str,
            typist: qemu.Typist | None = None, triggers: tuple[qemu.Trigger, ...] = (),
            initrd: Path | None = None) -> qemu.Boot:
    """Boot the VM's disk on ``lan`` (with our initramfs, unless ``initrd`` is given)."""
    return qemu.run(kernel=vm_images.kernel.vmlinuz, initrd=initrd or vm_images.initrd,
                    append=root_command_line(vm_images.disk, *extra),
                    devices=["-drive", f"file={vm_images.disk.image},format=raw,if=virtio,"
                             "snapshot=on", *lan.qemu_devices()],
                    log=log, timeout=BOOT_TIMEOUT, done_marker=DONE, typist=typist,
                    wrap=lan.wrap, triggers=triggers)


def assert_unlocked(result: qemu.Boot, vm_images: images.VmImages) -> None:
    context = console_context(result)
    assert not result.timed_out, f"no {DONE} within {BOOT_TIMEOUT:g} s; {context}"
    assert result.first(DONE) is not None, f"the root was not reached; {context}"
    uuid = vm_images.disk.luks_uuid
    assert f"root mount: /dev/mapper/luks-{uuid} / ext4" in result.text, context
    assert "Traceback" not in result.text, context


def test_our_agent_finds_our_server_by_zeroconf_over_ipv6_link_local(
        lan: VmLan, vm_images: images.VmImages, tmp_path: Path) -> None:
    """Neither ``mandos=connect:`` nor ``--connect``, and an IPv6-only link with no address
    but its link-local one: the agent browses, finds our server's announcement and fetches
    over IPv6 link-local (boots 1 and 6 of the boot matrix)."""
    section = section_for(vm_images, vm_images.passphrase)
    with tempfile.TemporaryDirectory(prefix="mandos-test-lan-") as directory, \
            OurServerInNamespace(lan.server, section, Path(directory)) as server:
        result = boot_on(lan, vm_images, tmp_path / "serial.log", *IPV6_ONLY)
        output = server.output()
    assert_unlocked(result, vm_images)
    context = console_context(result)
    assert result.first(r"mandos-password-agent: Zeroconf found \[fe80::") is not None, context
    assert result.first(r"mandos-password-agent: \[fe80::\S+ sent \d+ bytes") is not None, \
        context
    assert result.first(r"mandos-password-agent: answered ask\.") is not None, context
    sent = [line for line in output.splitlines() if "secret-sent" in line]
    assert len(sent) == 1 and f"client={CLIENT}" in sent[0] and "peer=fe80::" in sent[0], output


def test_no_server_the_human_types_the_passphrase(lan: VmLan, vm_images: images.VmImages,
                                                  tmp_path: Path) -> None:
    """No server anywhere (boot 4): the agent browses and retries meanwhile, the passphrase
    typed at systemd's console prompt (8 s after it appeared) unlocks the root, there is no
    emergency shell, and switch-root's SIGTERM stops the agent within a second, leaving no
    GnuPG home in /run."""
    result = boot_on(lan, vm_images, tmp_path / "serial.log", *IPV6_ONLY,
                     typist=qemu.Typist("Please enter passphrase for disk",
                                        vm_images.passphrase.read_bytes(), after=8.0))
    assert_unlocked(result, vm_images)
    context = console_context(result)
    assert result.first(r"(?i)emergency (mode|shell)|emergency\.(target|service)") is None, \
        context
    assert len(re.findall(r"mandos-password-agent: Zeroconf found no Mandos server",
                          result.text)) >= 2, f"the agent did not keep trying; {context}"
    assert result.first(r"mandos-password-agent: answered") is None, context
    stopping = result.first(r"Stopping .*Requests to a Mandos Server\.\.\.")
    stopped = result.first(r"mandos-password-agent: terminated by SIGTERM; exiting")
    assert stopping is not None and stopped is not None, context
    print(f"the agent stopped {stopped - stopping:.2f} s after systemd began to stop it")
    assert stopped - stopping <= 1.0, f"stopped {stopped - stopping:.2f} s after SIGTERM; {context}"
    run_directory = next(line for _, line in result.arrivals
                         if line.startswith("agent run directory:"))
    assert "gnupg" not in run_directory, context
    assert "gpg-agent processes: 0" in result.text, context


def test_our_agent_unlocks_from_debians_mandos_announced_by_avahi(
        lan: VmLan, vm_images: images.VmImages, private_bus: PrivateSystemBus,
        tmp_path: Path) -> None:
    """A mixed fleet (boot 2): Debian's own ``mandos`` server, announced by a real
    ``avahi-daemon``, hands our agent the password."""
    section = section_for(vm_images, vm_images.passphrase)
    with AvahiDaemon(lan.server, private_bus), UpstreamServer(
            section, address=None, zeroconf=True, interface=lan.server.interface,
            netns=lan.server.netns, bus=private_bus, debug=True) as server:
        result = boot_on(lan, vm_images, tmp_path / "serial.log", *IPV6_ONLY)
        log = server.log_text()
    assert_unlocked(result, vm_images)
    context = console_context(result)
    fetched = result.first(rf"mandos-password-agent: \[fe80::\S+\]:{server.port} sent \d+ bytes")
    assert fetched is not None, f"not fetched from upstream's server; {context}\n{log}"
    assert f"Sending secret to {CLIENT}" in log, log


#: A TCP listener with a backlog of 0 whose one queued connection is never accepted: the
#: kernel drops every SYN to a full accept queue, so, seen from the guest, a server whose
#: packets vanish.
BLACK_HOLE = ("import socket, sys, time\n"
              "s = socket.socket(socket.AF_INET6); s.bind(('::', int(sys.argv[1])))\n"
              "s.listen(0)\n"
              "c = socket.create_connection(('::1', int(sys.argv[1])))\n"
              "print('READY', flush=True); time.sleep(3600)\n")


def black_hole(lan: VmLan, port: int) -> BackgroundProgram:
    """:data:`BLACK_HOLE` on ``port`` of the server host, for a ``with``."""
    return BackgroundProgram(lan.pair.wrap(lan.server, [sys.executable, "-c", BLACK_HOLE,
                                                        str(port)]), ready="READY")


#: No duplicate address detection on the guest's link-local address: its random delay (up to
#: 2 s, while connections fail with "Cannot assign requested address") would otherwise differ
#: between the two boots compared, and it is the network's time, not the race's.
NO_DAD = ("sysctl.net.ipv6.conf.default.accept_dad=0",)


def _request_to_answer(result: qemu.Boot) -> float:
    request = result.first(r"mandos-password-agent: request ask\.")
    answered = result.first(r"mandos-password-agent: answered ask\.")
    assert request is not None and answered is not None, console_context(result)
    return answered - request


def test_a_black_holed_first_server_costs_under_a_second(
        lan: VmLan, vm_images: images.VmImages, tmp_path: Path) -> None:
    """Two servers given, the first black-holed (boot 7): the unlock takes at most a second
    longer than with the good server alone, in two boots of the same run."""
    section = section_for(vm_images, vm_images.passphrase)
    good = f"{lan.server.link_local}%eth0:{ZEROCONF_PORT}"
    dead = f"{lan.server.link_local}%eth0:{ZEROCONF_PORT + 1}"
    with tempfile.TemporaryDirectory(prefix="mandos-test-lan-") as directory, \
            OurServerInNamespace(lan.server, section, Path(directory)), \
            black_hole(lan, ZEROCONF_PORT + 1):
        seconds = {}
        for name, servers in (("alone", [good]), ("behind", [dead, good])):
            options = " ".join(f"--connect={server}" for server in servers)
            result = boot_on(lan, vm_images, tmp_path / f"serial-{name}.log", *IPV6_ONLY,
                             *NO_DAD, f'"systemd.setenv=MANDOS_PASSWORD_AGENT_OPTIONS={options}"')
            assert_unlocked(result, vm_images)
            seconds[name] = _request_to_answer(result)
    print(f"request to answer: {seconds['alone']:.2f} s with the server alone, "
          f"{seconds['behind']:.2f} s behind a black hole")
    assert result.first(rf"mandos-password-agent: \[{lan.server.link_local}%eth0\]:"
                        rf"{ZEROCONF_PORT} sent") is not None, console_context(result)
    assert seconds["behind"] <= seconds["alone"] + 1.0, seconds


class LateServer:
    """Our server, started on the server host ``delay`` seconds after the trigger fires (from
    a timer thread: the console reader must not block); :attr:`up` is when it had announced
    itself, in seconds after qemu started."""

    def __init__(self, lan: VmLan, section: str, directory: Path, delay: float) -> None:
        self.program = OurServerInNamespace(lan.server, section, directory)
        self.delay = delay
        self.up: float | None = None
        self.error: BaseException | None = None
        self._timer: threading.Timer | None = None
        self._started = False

    def trigger(self, pattern: str) -> qemu.Trigger:
        def fire(elapsed: float) -> None:
            fired = time.monotonic()

            def start() -> None:
                try:
                    self.program.__enter__()
                    self._started = True
                    self.up = elapsed + time.monotonic() - fired
                except BaseException as error:  # reported by the test
                    self.error = error
            self._timer = threading.Timer(self.delay, start)
            self._timer.start()
        return qemu.Trigger(pattern, fire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self._started:
            self.program.__exit__(None, None, None)


def test_the_server_comes_up_20_s_after_the_request(lan: VmLan, vm_images: images.VmImages,
                                                    tmp_path: Path) -> None:
    """A cold-rack start (boot 5): the server announces itself 20 s after the request, and
    the agent, browsing on meanwhile, unlocks within 2 s of that."""
    section = section_for(vm_images, vm_images.passphrase)
    with tempfile.TemporaryDirectory(prefix="mandos-test-lan-") as directory:
        late = LateServer(lan, section, Path(directory), delay=20.0)
        try:
            result = boot_on(lan, vm_images, tmp_path / "serial.log", *IPV6_ONLY,
                             triggers=(late.trigger(r"mandos-password-agent: request ask\."),))
        finally:
            late.stop()
    assert late.error is None, late.error
    assert_unlocked(result, vm_images)
    context = console_context(result)
    answered = result.first(r"mandos-password-agent: answered ask\.")
    assert late.up is not None and answered is not None, context
    print(f"server up at {late.up:.1f} s, answered at {answered:.1f} s")
    assert answered - late.up <= 2.0, f"answered {answered - late.up:.2f} s after; {context}"


def test_debians_own_dracut_module_unlocks_from_our_server(
        lan: VmLan, vm_images: images.VmImages, tmp_path: Path) -> None:
    """A mixed fleet the other way (boot 3): an initramfs that dracut built with Debian's
    own ``mandos-client`` and its module (upstream's ``password-agent`` and ``mandos-client``,
    keys from upstream's keygen) finds our server by Zeroconf and unlocks."""
    initrd, keydir = images.build_upstream()
    section = upstream.upstream_section(upstream.KeySet.in_directory(keydir), "vmupstream",
                                        vm_images.passphrase.read_bytes())
    with tempfile.TemporaryDirectory(prefix="mandos-test-lan-") as directory, \
            OurServerInNamespace(lan.server, section, Path(directory)) as server:
        result = boot_on(lan, vm_images, tmp_path / "serial.log", *IPV6_ONLY, initrd=initrd)
        output = server.output()
    assert_unlocked(result, vm_images)
    context = console_context(result)
    assert result.first(r"Started .*ask-password-mando") is not None, context
    assert result.first(r"(?<!/run/)mandos-password-agent:") is None, f"our agent ran; {context}"
    sent = [line for line in output.splitlines() if "secret-sent" in line]
    assert len(sent) == 1 and "client=vmupstream" in sent[0] and "peer=fe80::" in sent[0], \
        output
