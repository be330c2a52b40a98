# SPDX-License-Identifier: GPL-3.0-or-later
"""Every source file says its license (SPDX), as LICENSE and setup.cfg do: GPL-3.0-or-later."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAG = "SPDX-License-Identifier: GPL-3.0-or-later"
#: Source files by suffix, and by name for those without one.
SUFFIXES = {".py", ".sh", ".8", ".service", ".socket", ".path", ".catalog", ".yml"}
NAMES = {"dev", "rules", "postinst", "postrm", "rootfs-init", "hostroot-init"}


def _sources() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()
    paths = [REPO / name for name in listed]
    return [path for path in paths if path.is_file() and path.stat().st_size > 0
            and (path.suffix in SUFFIXES or path.name in NAMES
                 or path.name.rsplit(".", 1)[-1] in NAMES or path.parent.name == "bin")]


def test_every_source_file_carries_the_spdx_line() -> None:
    sources = _sources()
    assert len(sources) > 150
    missing = [str(path.relative_to(REPO)) for path in sources if TAG not in path.read_text()]
    assert missing == []


def test_the_spdx_line_matches_setup_cfg_and_license() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["license"] == TAG.split(": ")[1]
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()
    assert "Version 3" in (REPO / "LICENSE").read_text()
