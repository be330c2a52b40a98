# SPDX-License-Identifier: GPL-3.0-or-later
"""Fixtures of the VM tests."""

from __future__ import annotations

import shutil

import pytest

from peers.packages import Build
from peers.vm import images

#: Host programs the images and the boots need (./dev setup installs them).
PROGRAMS = ("qemu-system-x86_64", "dracut", "lsinitrd", "socat", "cryptsetup", "mkfs.ext4",
            "apt-get", "dpkg-deb", "depmod", "zstd", "gpg")


@pytest.fixture(scope="session")
def vm_images(packages: Build) -> images.VmImages:
    """The kernel, the LUKS disk, the keys and the initramfs that dracut built with our client
    package installed (cached)."""
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./dev setup", pytrace=False)
    return images.build(packages.deb("mandos-password-agent"))
