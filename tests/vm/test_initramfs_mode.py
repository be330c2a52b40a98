"""The initramfs holds the client's secret keys: it must end up readable by root alone, also
when dracut rebuilds an image that an earlier tool made world-readable.

dracut copies its finished image onto the output with ``cp``, which keeps the mode of an
existing file, and Debian's ``mkinitramfs`` makes images 0644; so ``dracut -f`` with our module
used to leave ``seckey.txt`` and ``tls-privkey.pem`` readable by every local user.  This runs
the real dracut with our module over an existing 0644 image.
"""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import pytest

from tests.vm import images

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_an_image_rebuilt_over_a_0644_one_is_private() -> None:
    cache = images.cache_directory()
    with images.locked(cache):
        kernel = images.kernel(cache)
        keydir, _ = images.secrets_directory(cache)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        output = Path(work) / "initrd.img"
        output.write_bytes(b"an older image, as mkinitramfs leaves it")
        output.chmod(0o644)
        images.make_initrd(output, kernel, keydir, Path(work))
        mode = stat.S_IMODE(output.stat().st_mode)
        assert output.stat().st_size > 1_000_000  # dracut did write the image
    assert mode == 0o600, oct(mode)
