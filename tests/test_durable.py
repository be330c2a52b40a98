# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos_protocol.durable: whole files in place, exact modes, nothing left behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandos_protocol import durable


@pytest.fixture
def umask() -> Iterator[None]:
    """A umask that would take bits away from any mode we ask for."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_replace_gives_the_exact_mode_whatever_the_umask(tmp_path: Path, umask: None,
                                                         mode: int) -> None:
    target = tmp_path / "file"
    durable.replace(target, b"contents", mode)
    assert target.read_bytes() == b"contents"
    assert _mode(target) == mode
    assert os.listdir(tmp_path) == ["file"]


def test_replace_swaps_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with open(target, "rb") as reader:  # a reader of the old file keeps seeing it, whole
        durable.replace(target, b"new", 0o600)
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "seckey.txt"
    target.write_bytes(b"old key")
    with pytest.raises(TypeError):
        durable.replace(target, "not bytes", 0o600)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old key"
    assert os.listdir(tmp_path) == ["seckey.txt"]


def test_a_temporary_is_hidden_beside_its_target(tmp_path: Path) -> None:
    temporary = durable.write_temporary(tmp_path / "pubkey.txt", b"key", 0o644)
    assert temporary.parent == tmp_path
    assert temporary.name.startswith(".pubkey.txt.") and temporary.name.endswith(".tmp")
    assert temporary.read_bytes() == b"key"
    assert _mode(temporary) == 0o644


def test_a_rename_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        durable.replace(tmp_path / "missing" / "file", b"x", 0o600)
    assert os.listdir(tmp_path) == []
