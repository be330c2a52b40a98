# SPDX-License-Identifier: GPL-3.0-or-later
"""The four files of a Mandos client key set, named as upstream's keygen names them.

The agent reads them (``--keydir`` or one option per file) and ``mandos-keygen`` writes them;
this is the one place that knows their names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KeyFiles:
    """Where each file of a key set is."""

    pubkey: Path
    seckey: Path
    tls_pubkey: Path
    tls_privkey: Path

    @classmethod
    def in_directory(cls, directory: Path) -> KeyFiles:
        return cls(directory / "pubkey.txt", directory / "seckey.txt",
                   directory / "tls-pubkey.pem", directory / "tls-privkey.pem")

    def all(self) -> tuple[Path, ...]:
        return (self.pubkey, self.seckey, self.tls_pubkey, self.tls_privkey)
