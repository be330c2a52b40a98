"""One version for the project (mandos_protocol.version): every command reports it with
``--version``, and the installed distribution's metadata carries it (setup.cfg reads it)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mandos_protocol.version import UPSTREAM_VERSION, VERSION, version_line

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(("command", "option"), [
    ("mandos-server", "--version"), ("mandos-server", "-v"),
    ("mandos-password-agent", "--version"), ("mandos-password-agent", "-V"),
    ("mandos-keygen", "--version"), ("mandos-keygen", "-v"),
    ("mandos-ctl", "--version"),
])
def test_every_command_reports_the_one_version(command: str, option: str) -> None:
    result = subprocess.run([BIN / command, option], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, version_line(command) + "\n", "")
    assert f" {VERSION} " in result.stdout and UPSTREAM_VERSION in result.stdout


def test_the_distribution_has_the_same_version() -> None:
    assert metadata.version("mandos-agent") == VERSION
