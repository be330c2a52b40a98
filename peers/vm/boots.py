# SPDX-License-Identifier: GPL-3.0-or-later
"""What the dracut boot tests share: the VM client's section, the kernel command line, and
how a boot's console is shown when an assertion fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from peers.vm import images, qemu

BOOT_TIMEOUT = 90.0
#: What the root file system's /sbin/init prints (peers/vm/rootfs-init).
DONE = "ROOT-UNLOCKED-OK"
CLIENT = "vmtest"


def section_for(vm_images: images.VmImages, passfile: Path) -> str:
    """The VM client's clients.conf section, its secret the password in ``passfile``,
    encrypted to the VM's key set by our keygen."""
    return subprocess.run(
        [sys.executable, "-m", "password_agent.keygen", "--dir", str(vm_images.keydir),
         "--name", CLIENT, "--passfile", str(passfile)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
        cwd=images.REPO).stdout


def root_command_line(disk: images.Disk, *extra: str) -> str:
    """Unlock and mount the LUKS root; every failure ends the VM at once instead of sitting at
    an emergency shell.  ``extra`` adds the network and Mandos parameters."""
    uuid = disk.luks_uuid
    return " ".join([
        "console=ttyS0", f"rd.luks.uuid={uuid}", f"root=/dev/mapper/luks-{uuid}",
        "rootfstype=ext4", "rw", "rd.shell=0", "rd.emergency=poweroff", "panic=-1",
        "systemd.show_status=1", "loglevel=4", *extra])


def console_context(result: qemu.Boot) -> str:
    """The serial log's path and last lines, for an assertion message."""
    return f"serial console ({result.log}), last lines:\n" + "\n".join(
        result.text.splitlines()[-40:])
