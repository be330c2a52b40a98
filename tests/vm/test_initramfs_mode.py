# SPDX-License-Identifier: GPL-3.0-or-later
"""The initramfs holds the client's secret keys: it must end up readable by root alone, also
when dracut rebuilds an image that an earlier tool made world-readable.

dracut copies its finished image onto the output with ``cp``, which keeps the mode of an
existing file, and Debian's ``mkinitramfs`` makes images 0644; so ``dracut -f`` with our module
used to leave ``seckey.txt`` and ``tls-privkey.pem`` readable by every local user.  This runs
the real dracut with our module over an existing 0644 image.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from peers.packages import Build
from peers.vm import images

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_an_image_rebuilt_over_a_0644_one_is_private(packages: Build) -> None:
    """With the client package installed, as an admin's ``dracut -f`` over an image that
    mkinitramfs left 0644."""
    cache = images.cache_directory()
    with images.locked(cache):
        kernel = images.kernel(cache)
        keydir, _ = images.secrets_directory(cache)
    with tempfile.TemporaryDirectory(dir=cache) as work, images.client_root(
            Path(work), kernel, keydir, packages.deb("mandos-password-agent")) as root:
        root.run("printf 'an older image, as mkinitramfs leaves it' > /boot/initrd.img\n"
                 "chmod 0644 /boot/initrd.img")
        images.run_dracut(root, kernel, "/boot/initrd.img")
        size, mode = root.run("stat -c '%s %a' /boot/initrd.img").stdout.split()
    assert int(size) > 1_000_000  # dracut did write the image
    assert mode == "600", mode
