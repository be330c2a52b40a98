# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos-keygen on a full key directory: a clear one-line error, a non-zero exit, no partial
key set and no temporary file left, old keys (``--force``) untouched; with space, it works.

The key directory is a small tmpfs of the test's own (``peers.mounts``), filled so that
only 0, 1, 2 or 3 of the four new key files fit (tmpfs gives each file whole pages): the
write fails at each of the four files in turn.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peers.mounts import fill, tmpfs
from tests.test_keygen import KEY_FILES, NAME, keygen

pytestmark = pytest.mark.peers

PAGE = os.sysconf("SC_PAGE_SIZE")


def _contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
def test_a_full_key_directory_fails_at_each_file_and_leaves_no_partial_keys(
        tmp_path: Path, force: bool) -> None:
    """4 tries each (room for 0 to 3 of the 4 files), then one with room for all, which also
    removes the temporary file that a killed keygen left."""
    directory = tmp_path / "keys"
    with tmpfs(directory, "64k"):
        if force:
            assert keygen(["-d", str(directory), "-n", NAME]).returncode == 0
        old = _contents(directory)
        for fitting in range(4):
            filler = fill(directory)
            os.truncate(filler, filler.stat().st_size - fitting * PAGE)
            result = keygen(["-d", str(directory), "-n", NAME, *(["--force"] if force else [])])
            assert result.returncode == 1, result
            message = result.stderr.decode()
            assert message.count("\n") == 1, message
            assert message.startswith(f"mandos-keygen: cannot write the key files in "
                                      f"{directory}: No space left on device"), message
            filler.unlink()
            assert _contents(directory) == old, f"room for {fitting}: {message}"
        # What a keygen killed while writing leaves (a secret key, perhaps): removed.
        (directory / ".seckey.txt.k1lled0x.tmp").write_bytes(b"an old secret key")
        result = keygen(["-d", str(directory), "-n", NAME, *(["--force"] if force else [])])
        assert result.returncode == 0, result
        made = _contents(directory)
        assert sorted(name for name in made if "~" not in name) == sorted(KEY_FILES)
        if force:
            assert {f"{name}.~1~": old[name] for name in KEY_FILES} == \
                {name: data for name, data in made.items() if "~" in name}
    print(f"{'--force over old keys' if force else 'fresh'}: 4 full-disk failures, "
          "1 success")
