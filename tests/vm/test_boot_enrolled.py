# SPDX-License-Identifier: GPL-3.0-or-later
"""A root enrolled only by ``mandos-luks bind`` unlocks at boot.

The disk's passphrase stays with the administrator: ``bind`` adds a keyslot opened by a fresh
random key and prints the section whose secret is that key, encrypted to the VM's OpenPGP key;
the section goes into the server's ``clients.d/``, as configuration management would drop it.
The passphrase's own keyslot is then wiped, so the only way into the disk is the bound key:
an unlocked root proves that the agent fetched, decrypted and sent exactly what ``bind`` made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peers.ours import OurServer, clients_conf
from peers.vm import images, qemu
from peers.vm.boots import BOOT_TIMEOUT, CLIENT, DONE, console_context, root_command_line

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def _luks(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "password_agent.luks", *arguments],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          cwd=images.REPO, timeout=120)


def _keyslots(disk: Path) -> dict[str, dict[str, object]]:
    dump = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(disk)],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    slots: dict[str, dict[str, object]] = json.loads(dump)["keyslots"]
    return slots


def test_a_root_enrolled_only_by_mandos_luks_bind_unlocks(vm_images: images.VmImages,
                                                           tmp_private: Path,
                                                           tmp_path: Path) -> None:
    disk = tmp_private / "disk.img"
    shutil.copyfile(vm_images.disk.image, disk)
    section = tmp_private / "vm.conf"
    bound = _luks("bind", str(disk), "--keydir", str(vm_images.keydir), "--name", CLIENT,
                  "--key-file", str(vm_images.passphrase), "--section-file", str(section),
                  "--no-ssh")
    assert bound.returncode == 0, bound.stderr
    assert vm_images.passphrase.read_text() not in section.read_text()
    listed = _luks("list", str(disk))
    assert listed.returncode == 0 and CLIENT in listed.stdout, listed.stdout + listed.stderr
    # Only the bound key opens the disk from now on.
    assert sorted(_keyslots(disk)) == ["0", "1"]
    subprocess.run(["cryptsetup", "luksKillSlot", "--batch-mode", str(disk), "0"], check=True,
                   capture_output=True, timeout=60)
    assert sorted(_keyslots(disk)) == ["1"]

    server = OurServer(clients_conf())  # no client in clients.conf itself
    (server.configdir / "clients.d").mkdir()
    shutil.copyfile(section, server.configdir / "clients.d" / "vm.conf")
    try:
        server.start()
        address, port = qemu.GUEST_SERVER
        append = root_command_line(vm_images.disk, "ip=dhcp", "rd.neednet=1",
                                   f"mandos=connect:{address}:{port}")
        result = qemu.boot(kernel=vm_images.kernel.vmlinuz, initrd=vm_images.initrd,
                           disk=disk, append=append, host_port=server.port,
                           log=tmp_path / "serial.log", timeout=BOOT_TIMEOUT, done_marker=DONE)
        context = console_context(result)
        assert not result.timed_out, f"no {DONE} within {BOOT_TIMEOUT:g} s; {context}"
        assert result.first(DONE) is not None, f"the root was not reached; {context}"
        uuid = vm_images.disk.luks_uuid
        assert f"root mount: /dev/mapper/luks-{uuid} / ext4" in result.text, context
        assert server.journal is not None
        assert len(server.journal.find("secret-sent", MANDOS_CLIENT=CLIENT)) == 1, context
    finally:
        server.close()
