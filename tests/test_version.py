# SPDX-License-Identifier: GPL-3.0-or-later
"""One version for the project (mandos_protocol.version): every console script in setup.cfg
reports it with ``--version`` (and with upstream's short option where upstream's command has
one), and the installed distribution's metadata carries it (setup.cfg reads it)."""

from __future__ import annotations

import configparser
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mandos_protocol.version import UPSTREAM_VERSION, VERSION, version_line

BIN = Path(sys.executable).parent
SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def _console_scripts() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG, encoding="utf-8")
    lines = parser["options.entry_points"]["console_scripts"].splitlines()
    return [line.split("=")[0].strip() for line in lines if line.strip()]


def _version_output(command: str, option: str) -> tuple[int, str, str]:
    result = subprocess.run([BIN / command, option], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("command", _console_scripts())
def test_every_command_reports_the_one_version(command: str) -> None:
    assert _version_output(command, "--version") == (0, version_line(command) + "\n", "")
    assert f" {VERSION} " in version_line(command)
    assert UPSTREAM_VERSION in version_line(command)


@pytest.mark.parametrize(("command", "option"), [
    ("mandos-server", "-v"), ("mandos-keygen", "-v"), ("mandos-password-agent", "-V"),
    ("mandos-luks", "-V"),
])
def test_short_options_as_upstream(command: str, option: str) -> None:
    assert _version_output(command, option) == (0, version_line(command) + "\n", "")


def test_the_distribution_has_the_same_version() -> None:
    assert metadata.version("mandos-agent") == VERSION
