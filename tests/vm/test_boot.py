# SPDX-License-Identifier: GPL-3.0-or-later
"""The whole chain in a real boot: a qemu VM whose root file system is LUKS2-encrypted boots a
dracut/systemd initramfs carrying our module (dracut-module/90mandos-agent); systemd-cryptsetup
asks for the passphrase; the request starts our agent (its ``.path`` unit), which stays resident
(``--watch``) from then on; it fetches the password from OUR server on host loopback (named by
``mandos=connect:`` on the kernel command line) and answers; it is stopped before switch-root and
removes its GnuPG home; the root is mounted from /dev/mapper/luks-UUID and its /sbin/init
reports what the agent left in /run and prints ROOT-UNLOCKED-OK.

qemu's stdin is /dev/null, so the console prompt that systemd shows in parallel cannot be what
answered; only the ``mandos=off`` boot has a typist at the console, who types the passphrase
there.  The images are cached (peers/vm/images.py); each boot takes about 20 s under TCG.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.ours import OurServer, clients_conf
from peers.vm import images, qemu
from peers.vm.boots import (
    BOOT_TIMEOUT,
    CLIENT,
    DONE,
    console_context,
    root_command_line,
    section_for,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow]

UNITS = "usr/lib/systemd/system"
#: A line our agent logs (not the root's listing of /run/mandos-password-agent).
AGENT_SAYS = r"(?<!/run/)mandos-password-agent:"


@pytest.fixture
def server(vm_images: images.VmImages) -> Iterator[OurServer]:
    """Our server on 127.0.0.1 with one client: the VM's key set, its secret the LUKS
    passphrase."""
    with OurServer(clients_conf(section_for(vm_images, vm_images.passphrase))) as running:
        yield running


def kernel_command_line(disk: images.Disk, *extra: str) -> str:
    """Over qemu's user networking, with the server named (slirp carries no Zeroconf)."""
    address, port = qemu.GUEST_SERVER
    # The module writes rd.neednet=1 only into host-only images; this one is generic.
    return root_command_line(disk, "ip=dhcp", "rd.neednet=1",
                             f"mandos=connect:{address}:{port}", *extra)


def test_our_agent_unlocks_the_luks_root(vm_images: images.VmImages, server: OurServer,
                                         tmp_path: Path) -> None:
    result = qemu.boot(kernel=vm_images.kernel.vmlinuz, initrd=vm_images.initrd,
                       disk=vm_images.disk.image,
                       append=kernel_command_line(vm_images.disk), host_port=server.port,
                       log=tmp_path / "serial.log", timeout=BOOT_TIMEOUT, done_marker=DONE)
    console = result.text
    context = console_context(result)

    assert not result.timed_out, f"no {DONE} within {BOOT_TIMEOUT:g} s; {context}"
    assert result.first(DONE) is not None, f"the root was not reached; {context}"
    uuid = vm_images.disk.luks_uuid
    assert f"root mount: /dev/mapper/luks-{uuid} / ext4" in console, context
    assert result.first(r"mandos-password-agent: answered ask\.\S+ \(Id cryptsetup:") \
        is not None, f"our agent did not say it answered; {context}"
    # Not started at boot, where it would compete with dracut's hooks and udev for the CPU:
    # the request starts it, and it answers that request before anything else.
    started = result.first(AGENT_SAYS)
    request = result.first(r"Please enter passphrase for disk")
    assert started is not None and request is not None and request <= started, \
        f"the agent started before the request; {context}"
    assert result.first(r"mandos-password-agent: a request is pending; answering it") \
        is not None, context
    assert result.first(r"mandos-password-agent: warm ") is None, context
    # Stopped before switch-root, it removed its GnuPG home (the secret key) from /run, which
    # the root keeps, and its gpg-agent is gone; the record of answers stays.
    stopped = result.first(r"mandos-password-agent: terminated by SIGTERM; exiting")
    assert stopped is not None, context
    assert "agent run directory: answered\n" in console, context
    assert "gpg-agent processes: 0\n" in console, context
    assert "Traceback" not in console, context
    assert server.journal is not None
    sent = server.journal.find("secret-sent", MANDOS_CLIENT=CLIENT)
    assert len(sent) == 1, f"server journal: {server.journal.entries}; {context}"
    timings = {name: result.first(pattern) for name, pattern in (
        ("initramfs", r"Welcome to .*\(Initramfs\)"),
        ("request", r"Please enter passphrase for disk"),
        ("agent sees it", r"mandos-password-agent: request ask\."),
        ("answered", r"mandos-password-agent: answered ask\."),
        ("root", DONE))}
    print("VM boot seconds after qemu start:",
          ", ".join(f"{name} {at:.1f}" for name, at in timings.items() if at is not None))


def test_a_wrong_password_is_sent_once_and_never_again(vm_images: images.VmImages,
                                                       tmp_private: Path, tmp_path: Path) -> None:
    """The server hands out a wrong password: systemd-cryptsetup rejects it and asks again, and
    our agent must leave that second request to the human (none here), so the boot ends in
    emergency, powered off, without a second try burnt."""
    wrong = tmp_private / "wrong"
    wrong.write_bytes(b"not the LUKS passphrase")
    with OurServer(clients_conf(section_for(vm_images, wrong))) as server:
        # timeout=: systemd-cryptsetup gives up on the unanswered second request soon.
        result = qemu.boot(kernel=vm_images.kernel.vmlinuz, initrd=vm_images.initrd,
                           disk=vm_images.disk.image,
                           append=kernel_command_line(vm_images.disk,
                                                      "rd.luks.options=timeout=10s"),
                           host_port=server.port, log=tmp_path / "serial.log",
                           timeout=BOOT_TIMEOUT, done_marker=DONE)
    console = result.text
    context = console_context(result)
    assert not result.timed_out, f"the VM did not power off; {context}"
    assert result.first(DONE) is None, f"a wrong password unlocked the root?; {context}"
    answered = re.findall(r"mandos-password-agent: answered ask\.\S+ \(Id cryptsetup:", console)
    assert len(answered) == 1, f"answered {len(answered)} times; {context}"
    assert result.first(r"mandos-password-agent: not answering ask\.\S+: this password was "
                        r"already sent") is not None, context


def test_mandos_off_leaves_the_disk_to_the_human_at_the_console(
        vm_images: images.VmImages, server: OurServer, tmp_path: Path) -> None:
    """``mandos=off`` on the kernel command line (the admin's way out): neither of our units
    starts, the server hears nothing, and the passphrase typed at systemd's console prompt
    unlocks the root."""
    result = qemu.boot(kernel=vm_images.kernel.vmlinuz, initrd=vm_images.initrd,
                       disk=vm_images.disk.image,
                       append=kernel_command_line(vm_images.disk, "mandos=off"),
                       host_port=server.port, log=tmp_path / "serial.log",
                       timeout=BOOT_TIMEOUT, done_marker=DONE,
                       typist=qemu.Typist("Please enter passphrase for disk",
                                          vm_images.passphrase.read_bytes()))
    console = result.text
    context = console_context(result)
    assert not result.timed_out, f"no {DONE} within {BOOT_TIMEOUT:g} s; {context}"
    uuid = vm_images.disk.luks_uuid
    assert f"root mount: /dev/mapper/luks-{uuid} / ext4" in console, context
    assert result.first(AGENT_SAYS) is None, f"our agent ran; {context}"
    # systemd's status lines shorten the units' names and descriptions, but keep their ends.
    assert result.first(r"a Mandos Server") is None, f"a unit of ours ran; {context}"
    assert "agent run directory: ls: /run/mandos-password-agent: No such file" in console, \
        context
    assert server.journal is not None
    heard = [entry for entry in server.journal.entries if "MANDOS_PEER" in entry]
    assert heard == [], f"the server heard from the VM; {context}"


def lsinitrd(image: Path, *files: str) -> str:
    """The image's listing, or with ``files`` their contents."""
    argv = ["lsinitrd", *(arg for name in files for arg in ("-f", name)), str(image)]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True
                          ).stdout.decode(errors="replace")


def test_initramfs_holds_the_agent_and_nothing_it_must_not(vm_images: images.VmImages) -> None:
    """What the module put in: the interpreter, the agent (with sdnotify), its keys private, the
    resident service and the .path unit enabled, with mandos=off honoured; and what it left
    out: the keygen, cryptography, Python's OpenSSL modules and libssl (libcrypto is there
    anyway, for cryptsetup), the archive formats, and every Python source (byte-code only)."""
    listing = lsinitrd(vm_images.initrd)
    # "mode links user group size month day time path[ -> target]"
    entries = {line.split(None, 8)[8].split(" -> ")[0]: line
               for line in listing.splitlines() if re.match(r"[-dlcbps][-rwxsStT]{9} ", line)}
    agent = "usr/lib/mandos-password-agent"
    for path in ("usr/bin/python3", f"{agent}/password_agent/__main__.pyc",
                 f"{agent}/password_agent/agent.pyc",
                 f"{agent}/mandos_protocol/gnutls.pyc", f"{agent}/gnupg.pyc",
                 f"{agent}/inotify_simple.pyc", f"{agent}/sdnotify/__init__.pyc",
                 "usr/lib/python3.11/os.pyc",
                 "usr/lib/python3.11/lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so",
                 "usr/lib/x86_64-linux-gnu/libgnutls.so.30", "usr/bin/gpg", "usr/bin/gpg-agent",
                 "usr/bin/gpgconf",
                 "etc/systemd/system/sysinit.target.wants/mandos-password-agent.path"):
        assert path in entries, f"{path} is missing from the initramfs"
    # The request starts the service (through the .path unit), never the boot.
    assert not [path for path in entries
                if path.endswith(".wants/mandos-password-agent.service")], entries
    for name in ("pubkey.txt", "seckey.txt", "tls-pubkey.pem", "tls-privkey.pem"):
        line = entries[f"etc/mandos/keys/{name}"]
        assert line.startswith("-rw------- ") and " root " in line, line
    assert entries["etc/mandos/keys"].startswith("drwx------"), entries["etc/mandos/keys"]
    unwanted = [path for path in entries
                if re.search(r"keygen|cryptography|libssl|_hashlib|/_ssl\.|/ssl\.py|/lzma\.", path)
                or re.search(r"^usr/lib/(python3|mandos-password-agent).*\.py$|__pycache__", path)]
    assert not unwanted, f"in the initramfs but not wanted: {unwanted}"
    # A generic (not host-only) image must not force the network up on every boot.
    assert "etc/cmdline.d/90mandos-agent.conf" not in entries
    units = lsinitrd(vm_images.initrd, f"{UNITS}/mandos-password-agent.service",
                     f"{UNITS}/mandos-password-agent.path")
    assert units.count("ConditionKernelCommandLine=!mandos=off") == 2, units
    assert ("ExecStart=/usr/bin/python3 -S -m password_agent --watch --keydir /etc/mandos/keys"
            in units)
    assert "Type=notify" in units
    assert "After=network-online.target" not in units  # it retries instead of waiting
    dropin = lsinitrd(vm_images.initrd,
                      f"{UNITS}/mandos-password-agent.service.d/50-networkd.conf")
    assert "Wants=systemd-networkd.service" in dropin, dropin
